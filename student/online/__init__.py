"""The online trainer (``codistill student online``): exactly-once distillation from a stream.

One trainer process is the single writer of its student. It leases the teacher
version it distils from (renewed while it runs, released when it exits; a killed
trainer's lease runs out: :mod:`~student.online.keeper`), then repeats, forever or
until the input ends:

1. **Planned batch** (:mod:`~student.online.plan`, :mod:`~student.online.loop`).
   Batches are offset ranges of one partition. ``until_end`` (tests, demo: the
   producer is known to be finished) follows the offset-only schedule of
   :mod:`~student.online.schedule` (full batches ``[start + kB, start + (k+1)B)``
   in turn, then each partition's final partial batch, then a joiner flush). Live
   mode applies a full batch of whichever partition has one (round robin), a
   partial batch once a partition's oldest waiting record is older than
   ``max_batch_wait_s``, and raises an idle partition's join watermark to the
   busy partitions' minimum. Every unit - with its kind, its idle advances and
   the store sequence its reads are pinned to - is written into the durable
   **plan** before it is applied; recovery replays the recorded entries, never a
   fresh decision, and ``replay_plan`` lets a fresh trainer replay a whole run.
   Each partition's history starts where the trainer began it (``start_from``)
   or where an accepted retention gap ends (:mod:`~student.online.retention`).
2. **Validate and join** (:mod:`~student.online.reader`). Bad records go to the
   dead-letter topic with their reason (never a crash); valid events feed the
   per-partition event-time Joiner.
3. **One step** (:mod:`~student.online.learner`). Soft labels of the ready
   impressions' queries are fetched in one batched call, candidate texts in
   another; ``OnlineLoss`` mixes listwise KD with IPW click feedback; queries
   without labels train on feedback only. An unreachable store is retried with
   capped exponential backoff (:mod:`~student.online.faults`) - the *same* batch,
   never skipped. All store reads of a batch happen before its side effects, so a
   retry never sends a dead letter twice.
4. **Checkpoint, then commit** (:mod:`~student.online.checkpoint`). Every
   ``checkpoint_every`` batches the model, optimizer, offsets, joiner, RNG,
   counters and the ledger of applied batches are written atomically; only then
   are the offsets committed to the consumer group. On restart the checkpoint -
   not the group - says where to resume, and the ledger refuses to apply any
   offset twice. A checkpoint is JSON and safetensors only; one carrying a pickle
   is refused. Before each checkpoint, and after every store outage, the version
   must still be in the store, complete and no smaller than the last checkpoint
   saw: a store that came back empty stops the trainer before it saves or commits
   anything (:mod:`~student.online.keeper`).

Why this is exactly-once: the model state and the offsets that produced it are
saved in one atomic step, so after a crash anywhere the trainer resumes from a
state whose offsets match its weights; the batches after that checkpoint are
replayed from the same offsets with the same joiner and RNG state and therefore
recompute the same updates. A resume under other hyperparameters than the
checkpoint's is refused unless accepted as a new segment, and never for another
``batch_size`` (:mod:`~student.online.resume`). Dead letters are at-least-once (keyed by source
position, so readers can drop repeats); Prometheus counters restart at zero.

Test hook: ``CODISTILL_TRAINER_CRASH_AT="after_plan:3,after_step:5,after_checkpoint:9"`` makes
the process SIGKILL itself at those points when its batch count reaches those
numbers (``after_plan`` = plan entry written, not applied; ``before_latest`` =
checkpoint renamed, LATEST not yet switched).

Layout: :mod:`~student.online.trainer` (:class:`OnlineTrainer`, the I/O) runs
:mod:`~student.online.loop` (recorded, replayed or fresh plan entries) and drives
:class:`~student.online.learner.OnlineLearner` (student + optimizer + loss, usable
in-process without any stream or store); ``python -m student.online`` runs one
trainer (:mod:`student.online.__main__`).
"""

from codistill.config import BackoffConfig, OnlineTrainerConfig
from student.online.bootstrap import TrainerError
from student.online.faults import CRASH_ENV
from student.online.learner import JoinedBatch, LearnStats, OnlineLearner
from student.online.trainer import OnlineTrainer, run_online

__all__ = [
    "CRASH_ENV",
    "BackoffConfig",
    "JoinedBatch",
    "LearnStats",
    "OnlineLearner",
    "OnlineTrainer",
    "OnlineTrainerConfig",
    "TrainerError",
    "run_online",
]

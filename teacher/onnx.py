"""ONNX export of a teacher's encoder: the graph that ranks like the teacher, without torch.

``export_teacher_onnx(teacher, model_dir, directory)`` writes three files:

===================== ================================================================
file                  content
===================== ================================================================
``teacher.onnx``      ``input_ids``, ``attention_mask`` int64 ``[batch, sequence]`` (both
                      axes dynamic) -> ``embeddings`` float32 ``[batch, d]``: the
                      transformer, the teacher's pooling (mean over the attention mask,
                      or CLS) and L2 normalisation, all inside the graph
``tokenizer.json``    the teacher's own tokenizer file (the one its version hashes);
                      :class:`TeacherTokenizer` cuts texts with it at the teacher's
                      ``max_seq_length``, as sentence-transformers does
``teacher_onnx.json`` the :class:`TeacherOnnxCard`: teacher version, lengths, scale,
                      pooling, opset, the parity measured at export and file hashes
===================== ================================================================

A score is ``logit_scale * (q @ c.T)``, as for the teacher (``teacher.model``). The
graph is traced with the TorchScript exporter at opset 17 (the exporter
``student.export`` uses: it needs no onnxscript) from the model in eval mode with
eager attention (the SDPA kernels trace to graphs with fixed shapes on some
versions). Before the function returns, ONNX Runtime runs the graph on sample texts
(built-in queries and code, plus any the caller gives) and every embedding must have
cosine at least ``1 - tolerance`` with the teacher's own ``encode``
(sentence-transformers); otherwise nothing is left behind and
:class:`TeacherOnnxError` says which text differed.

What uses it: ``benchmarks/serving.py`` ranks with the teacher on ONNX Runtime (same
threads, same session options as the student's bundle) to measure the latency the
distilled student saves.
"""

from __future__ import annotations

import inspect
import shutil
import threading
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from codistill.fsio import atomic_write_text, sha256_file
from teacher.model import Teacher

TEACHER_ONNX_FILE = "teacher.onnx"
TEACHER_TOKENIZER_FILE = "tokenizer.json"
TEACHER_ONNX_CARD = "teacher_onnx.json"
TEACHER_ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4

SAMPLE_TEXTS = (
    "read a file line by line",
    "parse a json string into a dict",
    "How do I sort a list of tuples by the second element?",
    "def read_lines(path):\n    with open(path) as fh:\n        return fh.read().splitlines()",
    "class Cache:\n    def __init__(self):\n        self._items = {}\n\n"
    "    def get(self, key, default=None):\n        return self._items.get(key, default)",
    "x",
    "αβγ 中文 😀 über-naïve identifiers_with_underscores camelCaseNames",
    "import numpy as np\n" + "values = np.arange(100).reshape(10, 10)\n" * 40,  # truncated
)


class TeacherOnnxError(RuntimeError):
    """The teacher cannot be exported, or its graph does not reproduce ``encode``."""


class TeacherOnnxCard(BaseModel):
    """``teacher_onnx.json``: what a reader of the graph needs, and the check it passed."""

    teacher_version: str
    base: str
    logit_scale: float
    max_seq_length: int
    dim: int
    pooling: str = Field(description="mean (over the attention mask) or cls")
    normalize: bool = True
    opset: int = TEACHER_ONNX_OPSET
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    parity: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


class TeacherTokenizer:
    """The teacher's ``tokenizer.json`` as sentence-transformers applies it.

    Truncation to ``max_len`` tokens (special tokens included), padding to the longest
    text of the batch; whatever truncation or padding the file itself configures is
    replaced (all-MiniLM's file pads to a fixed 128, for instance). Safe to share
    between threads: the truncation length is changed (under a lock) only when a call
    asks for another one, and encoding itself only reads the tokenizer.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._max_len: int | None = None
        self._lock = threading.Lock()
        pad = next((t for t in ("[PAD]", "<pad>", "<PAD>") if self._tok.token_to_id(t) is not None),
                   None)
        self.pad_id = int(self._tok.token_to_id(pad)) if pad is not None else 0  # masked anyway

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int64 ``[len(texts), longest]``."""
        if max_len != self._max_len:
            with self._lock:
                if max_len != self._max_len:
                    self._tok.enable_truncation(max_len)
                    self._max_len = max_len
        encs = self._tok.encode_batch(list(texts))
        width = max([len(e.ids) for e in encs] + [1])
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for row, enc in enumerate(encs):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        return ids, mask


class _Encoder(nn.Module):
    """``forward(input_ids, attention_mask) -> L2-normalised pooled embeddings``."""

    def __init__(self, transformer: nn.Module, pooling: str, token_types: bool) -> None:
        super().__init__()
        self.transformer, self.pooling, self.token_types = transformer, pooling, token_types

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_types:  # one segment, as the tokenizer gives for a single text
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = self.transformer(**kwargs)[0]
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        else:
            pooled = hidden[:, 0]
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def _pooling_mode(module: nn.Module) -> str:
    mode = getattr(module, "pooling_mode", None)  # sentence-transformers >= 6
    if mode is None:  # older releases: one flag per mode
        flags = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
        on = [name for name, attr in flags.items() if getattr(module, attr, False)]
        others = [a for a in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
                  if getattr(module, a, False)]
        mode = on[0] if len(on) == 1 and not others else "unsupported"
    mode = str(mode).lower()
    if mode not in ("mean", "cls"):
        raise TeacherOnnxError(f"pooling {mode!r} is not exported (mean and cls are)")
    return mode


def _encoder(teacher: Teacher) -> tuple[_Encoder, str]:
    """The wrapper to trace and its pooling mode; raises for module stacks it cannot mirror."""
    modules = list(teacher.model)
    names = [type(m).__name__ for m in modules]
    if not names or names[0] != "Transformer" or "Pooling" not in names:
        raise TeacherOnnxError(f"teacher modules {names}: expected Transformer, Pooling[, Normalize]")
    extra = [n for n in names if n not in ("Transformer", "Pooling", "Normalize")]
    if extra:
        raise TeacherOnnxError(f"teacher modules {extra} are not exported (only Transformer, "
                               "Pooling and Normalize)")
    pooling = _pooling_mode(modules[names.index("Pooling")])
    model = modules[0].auto_model
    token_types = "token_type_ids" in inspect.signature(model.forward).parameters
    return _Encoder(model, pooling, token_types), pooling


def _eager_attention(model: nn.Module) -> str | None:
    """Switch to eager attention for tracing; returns the previous implementation."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager"):
        return before
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    else:
        config._attn_implementation = "eager"  # type: ignore[union-attr]
    return before


def _restore_attention(model: nn.Module, before: str | None) -> None:
    if before in (None, "eager"):
        return
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(before)
    else:
        model.config._attn_implementation = before  # type: ignore[union-attr]


def check_parity(graph: Path, tokenizer: TeacherTokenizer, teacher: Teacher,
                 texts: Sequence[str], tolerance: float = PARITY_TOLERANCE,
                 batch_size: int = 16) -> dict[str, Any]:
    """ONNX Runtime on ``graph`` vs the teacher's sentence-transformers ``encode``.

    Texts are run in batches (so padding is exercised) and one at a time (the serving
    case, a query alone). Returns the figures; ``failures`` lists the texts whose
    cosine fell below ``1 - tolerance``.
    """
    import onnxruntime as ort

    texts = list(dict.fromkeys(texts))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    max_len = teacher.card.max_seq_length
    ref = teacher.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def run(chunk: Sequence[str]) -> np.ndarray:
        ids, mask = tokenizer.encode(chunk, max_len)
        return session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})[0]

    batched = np.concatenate([run(texts[i:i + batch_size])
                              for i in range(0, len(texts), batch_size)])
    single = np.concatenate([run([t]) for t in texts[: 2 * batch_size]])
    cos_batched = np.sum(batched * ref, axis=1)
    cos_single = np.sum(single * ref[: len(single)], axis=1)
    worst = float(1.0 - min(cos_batched.min(), cos_single.min()))
    failures = [texts[i] for i in range(len(texts))
                if 1.0 - cos_batched[i] > tolerance
                or (i < len(single) and 1.0 - cos_single[i] > tolerance)]
    return {"texts": len(texts), "max_one_minus_cosine": worst, "tolerance": tolerance,
            "max_abs_diff": float(np.abs(batched - ref).max()),
            "norm_error": float(np.abs(np.linalg.norm(batched, axis=1) - 1.0).max()),
            "failures": failures}


def export_teacher_onnx(teacher: Teacher, model_dir: str | Path, directory: str | Path,
                        texts: Sequence[str] = (), *, tolerance: float = PARITY_TOLERANCE
                        ) -> TeacherOnnxCard:
    """Trace ``teacher`` to ``directory/teacher.onnx``; check it; write the card.

    Parameters
    ----------
    teacher : Teacher
        A loaded teacher (``teacher.model.load_teacher``); its card gives the version,
        ``max_seq_length`` and logit scale.
    model_dir : str or Path
        The teacher's model folder (``TeacherRegistry.model_dir``), for ``tokenizer.json``.
    directory : str or Path
        Output folder (created; the three files in it are overwritten).
    texts : sequence of str
        Sample texts for the parity check, added to the built-in ones.
    tolerance : float
        Largest ``1 - cosine`` allowed between the graph and ``teacher.encode``.

    Raises
    ------
    TeacherOnnxError
        For an unsupported module stack, a missing ``tokenizer.json`` or a failed check
        (the folder's files are removed then).
    """
    model_dir, directory = Path(model_dir), Path(directory)
    tok_src = model_dir / TEACHER_TOKENIZER_FILE
    if not tok_src.is_file():
        raise TeacherOnnxError(f"{model_dir} has no {TEACHER_TOKENIZER_FILE} (a fast tokenizer "
                               "file is needed to tokenise without transformers)")
    directory.mkdir(parents=True, exist_ok=True)
    graph = directory / TEACHER_ONNX_FILE
    wrapper, pooling = _encoder(teacher)
    model = wrapper.transformer
    was_training = teacher.model.training
    device = next(model.parameters()).device
    teacher.model.eval()
    before = _eager_attention(model)
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]], dtype=torch.long,
                       device=device)
    mask = (torch.arange(ids.shape[1], device=device)[None] < torch.tensor([[4], [3]],
                                                                            device=device)).long()
    axes = {0: "batch", 1: "sequence"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings, the exporter's deprecation
            torch.onnx.export(
                wrapper, (ids, mask), str(graph),
                input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes,
                              "embeddings": {0: "batch"}},
                opset_version=TEACHER_ONNX_OPSET, dynamo=False,
            )
    finally:
        _restore_attention(model, before)
        teacher.model.train(was_training)
    shutil.copyfile(tok_src, directory / TEACHER_TOKENIZER_FILE)
    tokenizer = TeacherTokenizer(directory / TEACHER_TOKENIZER_FILE)
    parity = check_parity(graph, tokenizer, teacher, [*SAMPLE_TEXTS, *texts], tolerance)
    if parity["failures"]:
        for name in (TEACHER_ONNX_FILE, TEACHER_TOKENIZER_FILE):
            (directory / name).unlink(missing_ok=True)
        raise TeacherOnnxError(
            f"teacher {teacher.version}: the ONNX graph differs from encode on "
            f"{len(parity['failures'])} of {parity['texts']} texts (1 - cosine up to "
            f"{parity['max_one_minus_cosine']:.2e} > {tolerance}), e.g. "
            f"{parity['failures'][0]!r:.60}")
    card = TeacherOnnxCard(
        teacher_version=teacher.version, base=teacher.card.base,
        logit_scale=teacher.logit_scale, max_seq_length=teacher.card.max_seq_length,
        dim=teacher.dim, pooling=pooling,
        files={n: sha256_file(directory / n) for n in (TEACHER_ONNX_FILE, TEACHER_TOKENIZER_FILE)},
        parity={k: v for k, v in parity.items() if k != "failures"})
    atomic_write_text(directory / TEACHER_ONNX_CARD, card.model_dump_json(indent=2))
    return card


def load_teacher_onnx_card(directory: str | Path) -> TeacherOnnxCard | None:
    """The card of an export in ``directory`` if its files still match it, else ``None``."""
    directory = Path(directory)
    path = directory / TEACHER_ONNX_CARD
    if not path.is_file():
        return None
    card = TeacherOnnxCard.model_validate_json(path.read_text())
    for name, digest in card.files.items():
        if not (directory / name).is_file() or sha256_file(directory / name) != digest:
            return None
    return card

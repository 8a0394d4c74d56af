"""Decode an `llm` bundle on the device: onnxruntime with a KV cache, table rows from flash.

Per step the runtime feeds the decoder graph the new token ids, their absolute positions,
their MeKi rows (one `(1, T, d_mem)` input per layer, read from the memory-mapped table)
and the cached keys/values, and keeps the graph's present keys/values as OrtValues bound
straight back in (IOBinding), so the cache never round-trips through numpy. The context is
a sliding window of the training block size: RoPE is relative, so dropping the oldest
cached keys keeps every attention distance inside what the model was trained on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge.llm.files import BundleFiles
from edge.llm.sampling import Sampler
from edge.llm.spec import check_decoder, check_table_size, parse_llm_spec
from edge.llm.table import MemoryTable
from splitedge.bundle import Bundle
from splitedge.errors import SplitedgeError


@dataclass
class Generation:
    """Token ids and timings of one generate call."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    prompt_seconds: float = 0.0
    gen_seconds: float = 0.0
    gen_cpu_seconds: float = 0.0  # this process's CPU time over the same span (time.process_time)

    @property
    def prompt_tps(self) -> float:
        return len(self.prompt_ids) / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tps(self) -> float:
        """Tokens per second after the first (the first comes from the prefill's logits)."""
        return (
            (len(self.ids) - 1) / self.gen_seconds
            if self.gen_seconds and len(self.ids) > 1
            else 0.0
        )

    @property
    def gen_tps_cpu(self) -> float:
        """As gen_tps, per second of this process's CPU time: blind to time other processes take."""
        return (
            (len(self.ids) - 1) / self.gen_cpu_seconds
            if self.gen_cpu_seconds and len(self.ids) > 1
            else 0.0
        )


def cpu_session(model: Path | bytes, threads: int) -> ort.InferenceSession:
    """A CPU session for batch-1 decoding: few threads, no spinning, full graph fusion."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


class LlmRuntime:
    """One loaded llm bundle: tokenizer, decoder session, memory table and the KV cache.

    Start-up reads the manifest and the decoder (checked against its sha256 as read) and maps
    the table without reading it: every manifest field is checked against the others, the
    table file's size and the decoder's inputs first (edge.llm.spec), and the table's blocks
    are verified on first touch (edge.llm.table). A .tar bundle is read in place.
    """

    def __init__(self, bundle: Bundle | str | Path, threads: int = 1, iobinding: bool = True):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SplitedgeError(f"threads must be a positive integer, got {threads!r}")
        self.files = BundleFiles(bundle)
        where = self.files.where
        self.spec = parse_llm_spec(self.files.manifest, where)
        self.config: dict[str, Any] = dict(self.files.manifest["llm"]["config"])
        self.n_layer, self.n_head = self.spec.n_layer, self.spec.n_head
        self.head_dim = self.spec.head_dim
        self.context = self.spec.block_size
        self.eot_id = self.spec.eot_id
        self.decoder_bytes = len(decoder := self.files.read(self.spec.decoder))
        try:
            self.session = cpu_session(decoder, threads)
        except Exception as e:  # onnxruntime's errors are multi-line; keep the first
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SplitedgeError(
                f"{where}: {self.spec.decoder} is not a decoder onnxruntime can load "
                f"({first[:160]}); re-fold the bundle"
            ) from None
        del decoder
        check_decoder(self.spec, self.session, where)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.table: MemoryTable | None = None
        if self.spec.table is not None:
            path, offset, size = self.files.locate(self.spec.table.file)
            check_table_size(self.spec.table, size, where)
            whole = self.files.manifest["files"].get(self.spec.table.file)
            self.table = MemoryTable(path, self.spec.table, offset, size, file_sha256=whole)
        self._tokenizer: Any = None
        self.iobinding = iobinding
        self._init_step_binding()
        self.reset()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:  # loaded on first use: scoring and benches need none
            from tokenizers import Tokenizer

            data = self.files.read(self.spec.tokenizer)
            try:
                tok = Tokenizer.from_str(data.decode("utf-8"))
            except Exception as e:
                raise SplitedgeError(
                    f"{self.files.where}: {self.spec.tokenizer} is not a tokenizer "
                    f"({str(e).strip()[:120]}); re-fold the bundle"
                ) from None
            if tok.get_vocab_size() > self.spec.vocab_size:
                raise SplitedgeError(
                    f"{self.files.where}: {self.spec.tokenizer} has {tok.get_vocab_size()} "
                    f"tokens, more than llm.config.vocab_size {self.spec.vocab_size}; "
                    "re-fold the bundle"
                )
            self._tokenizer = tok
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; refuses text that is not valid Unicode (e.g. undecodable bytes)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # argv bytes that were not UTF-8 arrive as surrogates
            raise SplitedgeError(
                f"the prompt is not valid UTF-8 (character {e.start}); pass UTF-8 text"
            ) from None
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))

    def reset(self) -> None:
        """Empty the KV cache."""
        empty = np.zeros((1, self.n_head, 0, self.head_dim), dtype=np.float32)
        self._past: list[Any] = [
            ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * self.n_layer)
        ]
        self._past_len = 0
        self._next_pos = 0

    def forward(self, ids: Sequence[int], rows: np.ndarray | None = None) -> np.ndarray:
        """Run new tokens through the decoder, extend the cache; logits (T, V).

        rows: their table rows (L, T, d_mem) if already fetched, else read here.
        """
        T = len(ids)
        if T == 1 and rows is None and self.iobinding:
            return self._step(int(ids[0]))
        if T == 0 or T > self.context:
            raise ValueError(f"feed 1..{self.context} tokens at a time, got {T}")
        if self._past_len + T > self.context:
            self._slide(self.context - T)
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray(ids, dtype=np.int64).reshape(1, T),
            "position_ids": np.arange(self._next_pos, self._next_pos + T, dtype=np.int64)[None],
        }
        if self.table is not None:
            rows = self.table.rows(np.asarray(ids)) if rows is None else rows
            for i in range(self.n_layer):
                feeds[f"memory_rows_{i}"] = rows[i][None]  # (1, T, d_mem), contiguous
        if self.iobinding:
            logits, self._past = self._run_bound(feeds)
        else:
            for i in range(self.n_layer):
                feeds[f"past_key_{i}"] = self._past[2 * i].numpy()
                feeds[f"past_value_{i}"] = self._past[2 * i + 1].numpy()
            outs = self.session.run(None, feeds)
            logits = outs[0]
            self._past = [ort.OrtValue.ortvalue_from_numpy(o) for o in outs[1:]]
        self._past_len += T
        self._next_pos += T
        return np.asarray(logits)[0]

    def _init_step_binding(self) -> None:
        """A persistent IOBinding for one-token steps: id, position and MeKi rows are fixed
        buffers bound once, so a step only rewrites them and rebinds the KV cache."""
        self._step_ids = np.zeros((1, 1), dtype=np.int64)
        self._step_pos = np.zeros((1, 1), dtype=np.int64)
        d_mem = self.table.d_mem if self.table is not None else 0
        self._step_rows = np.zeros((self.n_layer, 1, 1, d_mem), dtype=np.float32)
        self._step_binding = self.session.io_binding()
        fixed = {"input_ids": self._step_ids, "position_ids": self._step_pos}
        if self.table is not None:
            fixed.update({f"memory_rows_{i}": self._step_rows[i] for i in range(self.n_layer)})
        # the OrtValues share the numpy buffers; keep both alive for the session's life
        self._step_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in fixed.items()}
        for name, value in self._step_values.items():
            self._step_binding.bind_ortvalue_input(name, value)
        self._past_names = [
            f"past_{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")
        ]

    def _step(self, token: int) -> np.ndarray:
        """One new token through the persistent binding; logits (1, V)."""
        if self._past_len + 1 > self.context:
            self._slide(self.context - 1)
        self._step_ids[0, 0] = token
        self._step_pos[0, 0] = self._next_pos
        if self.table is not None:
            self.table.rows_into(token, self._step_rows)
        binding = self._step_binding
        for name, value in zip(self._past_names, self._past, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        self._past = list(outs[1:])
        self._past_len += 1
        self._next_pos += 1
        return np.asarray(outs[0].numpy())[0]

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[Any]]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for i in range(self.n_layer):
            binding.bind_ortvalue_input(f"past_key_{i}", self._past[2 * i])
            binding.bind_ortvalue_input(f"past_value_{i}", self._past[2 * i + 1])
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(outs[1:])

    def _slide(self, keep: int) -> None:
        """Drop the oldest cached positions, keeping `keep` (at most half the window, so this is rare)."""
        keep = min(keep, self.context // 2)
        self._past = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, -keep:]))
            if keep
            else ort.OrtValue.ortvalue_from_numpy(v.numpy()[:, :, :0].copy())
            for v in self._past
        ]
        self._past_len = keep

    def iter_generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampler: Sampler | None = None,
        seed: int = 0,
        stop_at_eot: bool = True,
        record: Generation | None = None,
    ) -> Iterator[int]:
        """Prefill the prompt, then yield up to max_new_tokens sampled ids; timings go to `record`.

        An empty prompt starts a new document: decoding begins after the end-of-text token.
        A prompt longer than the context keeps its last block_size - 1 tokens. Logits that are
        not finite (a table or decoder holding NaN/inf) stop generation with an error.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SplitedgeError(f"seed must be an integer >= 0, got {seed!r}")
        sampler = sampler or Sampler()
        rng = np.random.default_rng(seed)
        gen = record if record is not None else Generation(prompt_ids=[])
        gen.prompt_ids = list(prompt_ids)[-(self.context - 1) :] or [self.eot_id]
        self.reset()
        t0 = time.perf_counter()
        rows = self.table.rows(np.asarray(gen.prompt_ids)) if self.table is not None else None
        logits = self.forward(gen.prompt_ids, rows)[-1]  # prompt rows were fetched before prefill
        gen.prompt_seconds = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(max_new_tokens):
            if not np.isfinite(logits).all():
                raise self._non_finite(len(gen.prompt_ids) + i)
            token = sampler(logits, rng)
            if self.table is not None:
                self.table.prefetch(token)  # start the flash read while the caller emits text
            gen.ids.append(token)
            gen.gen_seconds = time.perf_counter() - t0
            gen.gen_cpu_seconds = time.process_time() - c0
            yield token
            if (stop_at_eot and token == self.eot_id) or i == max_new_tokens - 1:
                break
            logits = self.forward([token])[-1]

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampler: Sampler | None = None,
        seed: int = 0,
        stop_at_eot: bool = True,
    ) -> Generation:
        """Generate without streaming; returns the ids and timings."""
        gen = Generation(prompt_ids=[])
        for _ in self.iter_generate(prompt_ids, max_new_tokens, sampler, seed, stop_at_eot, gen):
            pass
        return gen

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        sampler: Sampler | None = None,
        seed: int = 0,
        record: Generation | None = None,
    ) -> Iterator[str]:
        """Generate text from a prompt, yielding decoded pieces as soon as they are whole characters.

        The prompt is encoded (and refused if it is not valid UTF-8) when this is called,
        before the first piece is asked for.
        """
        ids = self.encode(prompt)
        return self._pieces(ids, max_new_tokens, sampler, seed, record)

    def _pieces(
        self,
        ids: list[int],
        max_new_tokens: int,
        sampler: Sampler | None,
        seed: int,
        record: Generation | None,
    ) -> Iterator[str]:
        from tokenizers.decoders import DecodeStream

        decoder = DecodeStream(skip_special_tokens=True)
        for token in self.iter_generate(ids, max_new_tokens, sampler, seed, True, record):
            piece = decoder.step(self.tokenizer, token)
            if piece:
                yield piece

    def score(self, tokens: np.ndarray, limit: int | None = None) -> dict[str, float]:
        """Mean next-token NLL and perplexity over consecutive context-size windows (as training scores)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n = tokens.size - 1 if limit is None else min(limit, tokens.size - 1)
        total, count = 0.0, 0
        for s in range(0, n - self.context + 1, self.context):
            x, y = tokens[s : s + self.context], tokens[s + 1 : s + 1 + self.context]
            self.reset()
            logits = self.forward(x.tolist()).astype(np.float64)  # (T, V)
            if not np.isfinite(logits).all():
                raise self._non_finite(s)
            m = logits.max(axis=1, keepdims=True)
            logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
            total += float((logz - logits[np.arange(y.size), y]).sum())
            count += y.size
        if count == 0:
            raise SplitedgeError(f"need more than {self.context} tokens to score perplexity")
        return {
            "val_loss": total / count,
            "val_ppl": float(np.exp(total / count)),
            "val_tokens": count,
        }

    def _non_finite(self, position: int) -> SplitedgeError:
        return SplitedgeError(
            f"{self.files.where}: the decoder gave non-finite logits (NaN or inf) at token "
            f"position {position}; its table or decoder holds non-finite values: "
            "re-fold the bundle"
        )

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
        self.files.close()

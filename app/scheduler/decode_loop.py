"""The in-flight batching decode loop: windows join and leave a running batch between steps.

Rows of the engine's preallocated caches are the unit of space. A window takes a contiguous run
of rows (1 for greedy, beam_size or best_of otherwise) where the scheduler's RowPlan put it
(app.scheduler.rows). Every step decodes all occupied rows in one engine call; finished and
cancelled windows free their rows, the last windows move down into the holes (so the decoded span
stays dense), and waiting windows are encoded and prefilled into free rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.constants import MAX_NEW_TOKENS
from app.decoding.prompt import window_prompt
from app.decoding.repetition import not_repetitive
from app.decoding.rules import RowRules, apply_rules
from app.decoding.search import (
    BeamSearch,
    SamplingSearch,
    Search,
    make_search,
    rows_needed,
    top_continuations,
)
from app.decoding.tokenizer import WhisperTokenizer
from app.decoding.window import WindowResult, WindowTask
from app.engine.base import Engine
from app.engine.host_copy import device_tensor
from app.scheduler.rows import RowPlan, cross_runs, first_fit


def stack_on_one_device(mels: list[Tensor]) -> Tensor:
    """Stack windows' log-mels on the device most of them were computed on: long files' features
    are computed on the CPU, the others' where the engine runs (ModelContext.feature_device)."""
    device = next((m.device for m in mels if m.device.type != "cpu"), mels[0].device)
    return torch.stack([m.to(device) for m in mels])


@dataclass(eq=False)
class ActiveWindow:
    task: WindowTask
    search: Search
    start: int
    n_rows: int
    prompt: list[int]
    position: int = 0  # next self-attention cache position to write
    max_new_tokens: int = MAX_NEW_TOKENS
    next_tokens: list[int] = field(default_factory=list)
    no_speech_prob: float = 0.0
    language: str | None = None
    language_probs: dict[str, float] | None = None
    audio_features: Tensor | None = None
    rules: RowRules | None = None
    n_audio: int = 0  # encoder positions of this window's audio (1500 unless trimmed)

    @property
    def rows(self) -> range:
        return range(self.start, self.start + self.n_rows)


class DecodeLoop:
    """Not thread-safe: owned by the scheduler's engine thread."""

    def __init__(self, engine: Engine, tokenizer: WhisperTokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = engine.config
        self.n_ctx = engine.config.dims.n_text_ctx
        self.owner: list[ActiveWindow | None] = [None] * engine.max_rows
        self.active: list[ActiveWindow] = []

    # ---- row bookkeeping -------------------------------------------------------------------
    def rows_in_use(self) -> int:
        return sum(w.n_rows for w in self.active)

    def span(self) -> int:
        return max((w.start + w.n_rows for w in self.active), default=0)

    @property
    def rows(self) -> int:
        """Decoder rows of the engine's caches."""
        return len(self.owner)

    def plan(self) -> RowPlan:
        """A plan over the rows free now, for placing windows before admit()."""
        return RowPlan([w is not None for w in self.owner])

    def cancel(self, task: WindowTask) -> None:
        """Drop `task`'s window (its client went away): its rows are free from now on."""
        gone = [w for w in self.active if w.task is task]
        if gone:
            self.active = [w for w in self.active if w.task is not task]
            self._release(gone)

    def reset(self) -> None:
        """Forget every window (after a failed step): all rows are free."""
        self.active.clear()
        self.owner[:] = [None] * len(self.owner)

    # ---- admission: encode, cross-K/V, language detection, prompt prefill -------------------
    def admit(self, tasks: list[WindowTask], plan: RowPlan | None = None) -> list[tuple[WindowTask, WindowResult]]:
        """Start decoding `tasks`, each in the rows `plan` placed it in (None: placed here, by the
        same rule). Returns the windows that finished at once."""
        if plan is None:
            plan = self.plan()
        placed: list[ActiveWindow] = []
        for task in tasks:
            start = plan.start_of(task)
            if start is None:
                start = plan.place(task)
            k = rows_needed(task.options)
            if start is None or any(self.owner[r] is not None for r in range(start, start + k)):
                raise RuntimeError("admit() called without room; place the windows on a plan() first")
            window = ActiveWindow(task, make_search(task.options, self.tokenizer.eot, MAX_NEW_TOKENS), start, k, [])
            for r in window.rows:
                self.owner[r] = window
            placed.append(window)
        if not placed:
            return []
        self._encode(placed)
        for w in placed:
            self._prepare(w)
        finished: list[ActiveWindow] = []
        logits_by_window = self._prefill(placed)
        self._advance(placed, logits_by_window, finished)
        self.active.extend(w for w in placed if w not in finished)
        return self._finish(finished)

    def _encode(self, windows: list[ActiveWindow]) -> None:
        """Write the windows' cross-attention K/V into their rows, encoding those not encoded yet.

        Windows go to the engine in groups of one length: a trimmed audio context is shorter, and
        a retry at a higher temperature brings its encoder output (only its K/V are recomputed).
        """
        encoded: dict[int, list[tuple[ActiveWindow, Tensor]]] = {}
        fresh: dict[int, list[ActiveWindow]] = {}
        for w in windows:
            known = w.task.audio_features
            if known is not None:
                encoded.setdefault(known.shape[1], []).append((w, known))
            else:
                fresh.setdefault(w.task.mel.shape[-1], []).append(w)
        for pairs in encoded.values():
            features = torch.cat([known for _, known in pairs])
            self.engine.features_into_rows(features, [w.start for w, _ in pairs])
            for w, known in pairs:
                w.n_audio = features.shape[1]
                if w.task.keep_audio_features:
                    w.audio_features = known
        for same in fresh.values():
            mel = stack_on_one_device([w.task.mel for w in same])
            features = self.engine.encode_into_rows(mel, [w.start for w in same])
            for i, w in enumerate(same):
                w.n_audio = features.shape[1]
                if w.task.keep_audio_features:
                    w.audio_features = features[i : i + 1].clone()

    def _prepare(self, w: ActiveWindow) -> None:
        options = w.task.options
        language = options.language
        if self.config.multilingual and language is None:
            language, w.language_probs = self._detect_language(w)
        w.language = language if self.config.multilingual else "en"
        w.prompt = window_prompt(self.tokenizer, options, w.task.previous_tokens, language, self.n_ctx)
        w.max_new_tokens = min(options.max_new_tokens, self.n_ctx - len(w.prompt))
        w.search.max_new_tokens = w.max_new_tokens
        w.rules = RowRules.for_window(options, self.config)

    def _detect_language(self, w: ActiveWindow) -> tuple[str, dict[str, float]]:
        tok = self.tokenizer
        logits = self.engine.decode(torch.tensor([[tok.sot]]), torch.tensor([0]), w.start, 1,
                                    cross_runs=[(0, 1, 1, w.n_audio)])[0, -1]
        ids = torch.tensor(tok.language_token_ids, device=logits.device)
        probs = torch.softmax(logits[ids], dim=-1).tolist()
        by_code = {tok.id_to_language[i]: p for i, p in zip(tok.language_token_ids, probs, strict=True)}
        return max(by_code, key=by_code.__getitem__), by_code

    def _prefill(self, windows: list[ActiveWindow]) -> dict[int, Tensor]:
        """Feed each new window's prompt; return its last-position logits [n_rows, V] by id().

        A window's rows all start from the same prompt, so only its first row is fed and the
        resulting self-attention K/V (and, where the engine reads cross-attention K/V per row,
        those too) are copied to the others.
        """
        out: dict[int, Tensor] = {}
        # Adjacent windows with equal prompt length go through the engine together.
        ordered = sorted(windows, key=lambda w: w.start)
        i = 0
        while i < len(ordered):
            j = i + 1
            while (j < len(ordered) and len(ordered[j].prompt) == len(ordered[i].prompt)
                   and ordered[j - 1].n_rows == 1
                   and ordered[j].start == ordered[j - 1].start + ordered[j - 1].n_rows):
                j += 1
            group = ordered[i:j]
            plen = len(group[0].prompt)
            tokens = torch.tensor([w.prompt for w in group])
            positions = torch.zeros(tokens.shape[0], dtype=torch.long)
            logits = self.engine.decode(tokens, positions, group[0].start, plen,
                                        cross_runs=cross_runs([(k, 1, w.n_audio) for k, w in enumerate(group)]))
            # every window's no-speech probability in one op and one device sync
            sot_logits = logits[torch.arange(len(group)), [w.prompt.index(self.tokenizer.sot) for w in group]]
            no_speech = torch.softmax(sot_logits.float(), dim=-1)[:, self.tokenizer.no_speech].tolist()
            for k, w in enumerate(group):
                w.no_speech_prob = no_speech[k]
                out[id(w)] = logits[k, -1:].expand(w.n_rows, -1)
                w.position = plen
                if w.n_rows > 1:  # the beams / samples start from the first row's state
                    self.engine.copy_rows([w.start] * (w.n_rows - 1), list(w.rows)[1:], plen,
                                          cross=not self.engine.cross_in_first_row)
            i = j
        return out

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[tuple[WindowTask, WindowResult]]:
        """One decoder step for every active row. Returns the windows that finished."""
        if not self.active:
            return []
        greedy = self._greedy_chunk_windows()
        if greedy is not None:
            return self._greedy_chunk_step(greedy)
        return self._single_step()

    def _single_step(self) -> list[tuple[WindowTask, WindowResult]]:
        span = self.span()
        eot = self.tokenizer.eot
        tokens = [eot] * span
        positions = [0] * span
        for w in self.active:
            for j, r in enumerate(w.rows):
                tokens[r] = w.next_tokens[j]
                positions[r] = w.position
        kv_len = max(positions) + 1
        uniform = len(set(positions)) == 1
        logits = self.engine.decode(torch.tensor(tokens)[:, None], torch.tensor(positions), 0, kv_len,
                                    uniform_position=uniform, cross_runs=self._cross_runs())[:, -1]
        for w in self.active:
            w.position += 1
        by_window = {id(w): logits[w.start : w.start + w.n_rows] for w in self.active}
        finished: list[ActiveWindow] = []
        self._advance(self.active, by_window, finished)
        self.active = [w for w in self.active if w not in finished]
        return self._finish(finished)

    def _cross_runs(self) -> list[tuple[int, int, int, int]]:
        return cross_runs([(w.start, w.n_rows, w.n_audio) for w in sorted(self.active, key=lambda w: w.start)])

    # ---- greedy fast path: K steps on the device without a host round trip -----------------
    def _greedy_chunk_windows(self) -> list[tuple[ActiveWindow, SamplingSearch]] | None:
        """Every active window with its greedy search, when all of them may take a chunk of
        steps on the device (greedy, no timestamp rules, one suppression list); else None."""
        if not self.engine.greedy_chunks:
            return None
        windows: list[tuple[ActiveWindow, SamplingSearch]] = []
        suppress: set[tuple[int, ...]] = set()
        for w in self.active:
            search = w.search
            if not isinstance(search, SamplingSearch) or not search.is_greedy:
                return None
            if w.rules is None or w.rules.timestamps:
                return None
            suppress.add(w.rules.suppress)
            windows.append((w, search))
        return windows if len(suppress) == 1 else None

    def _greedy_chunk_step(self, windows: list[tuple[ActiveWindow, SamplingSearch]]
                           ) -> list[tuple[WindowTask, WindowResult]]:
        span = self.span()
        eot = self.tokenizer.eot
        tokens = [eot] * span
        positions = [0] * span
        done = [True] * span
        # tokens each row may still emit: the chunk stops a row there (and its sum of log-probs
        # with it) and decodes no step past the largest budget
        remaining = [0] * span
        for w, search in windows:
            tokens[w.start] = w.next_tokens[0]
            positions[w.start] = w.position
            done[w.start] = False
            remaining[w.start] = w.max_new_tokens - len(search.sequences[0])
        # one suppression list for all of them (_greedy_chunk_windows checked it)
        suppress = next(w.rules.suppress for w, _ in windows if w.rules is not None)
        out = self.engine.greedy_chunk(torch.tensor(tokens), torch.tensor(positions),
                                       torch.tensor(done), suppress, remaining)
        if out is None:  # no captured bucket fits (near the context end): single steps instead
            return self._single_step()
        out_tokens, _, sum_lp = (t.tolist() for t in out)
        finished: list[ActiveWindow] = []
        for w, search in windows:
            row = out_tokens[w.start]
            search.sum_logprobs[0] += sum_lp[w.start]
            for token in row:
                if token == eot:
                    search.done[0] = True
                    break
                search.sequences[0].append(token)
                if len(search.sequences[0]) >= w.max_new_tokens:
                    search.done[0] = True
                    break
            w.position += len(row)
            w.next_tokens = [row[-1]]
            if search.done[0] or w.position >= self.n_ctx - 1:
                finished.append(w)
        self.active = [w for w in self.active if w not in finished]
        return self._finish(finished)

    def _advance(self, windows: list[ActiveWindow], logits_by_window: dict[int, Tensor],
                 finished: list[ActiveWindow]) -> None:
        if not windows:
            return
        logits = torch.cat([logits_by_window[id(w)] for w in windows]).float()
        row_rules: list[RowRules] = []
        for w in windows:
            assert w.rules is not None
            for history in w.search.row_histories():
                rule = RowRules(history, w.rules.suppress, w.rules.suppress_begin, w.rules.timestamps,
                                w.rules.max_initial_timestamp_index)
                row_rules.append(rule)
        apply_rules(logits, row_rules, self.tokenizer)
        # Greedy windows are advanced together: one argmax / log-softmax for all of them.
        offsets: list[int] = []
        offset = 0
        for w in windows:
            offsets.append(offset)
            offset += w.n_rows
        greedy = {i: w.search for i, w in enumerate(windows)
                  if isinstance(w.search, SamplingSearch) and w.search.is_greedy}
        if greedy:
            idx = device_tensor([offsets[i] for i in greedy], logits.device)
            sub = logits[idx]
            best = sub.argmax(dim=-1)
            chosen = torch.log_softmax(sub, dim=-1).gather(1, best[:, None]).squeeze(1)
            for (i, sampling), token, lp in zip(greedy.items(), best.tolist(), chosen.tolist(), strict=True):
                w = windows[i]
                if sampling.push_greedy(token, lp) or w.position >= self.n_ctx:
                    finished.append(w)
                w.next_tokens = [token]
        beam_tops = self._beam_continuations(windows, offsets, logits)
        # beam reorders of every window in one copy: rows of different windows never overlap
        src_rows: list[int] = []
        dst_rows: list[int] = []
        for i, w in enumerate(windows):
            if i in greedy:
                continue
            offset = offsets[i]
            search = w.search
            if isinstance(search, BeamSearch) and i in beam_tops:
                out = search.step_from_top(*beam_tops[i])
            else:
                out = search.step(logits[offset : offset + w.n_rows])
            if out.sources is not None and out.sources != list(range(w.n_rows)):
                src_rows += [w.start + s for s in out.sources]
                dst_rows += list(w.rows)[: len(out.sources)]
            tokens = out.next_tokens
            if len(tokens) < w.n_rows:  # beam search found fewer live hypotheses than rows
                tokens = tokens + [tokens[0] if tokens else self.tokenizer.eot] * (w.n_rows - len(tokens))
            w.next_tokens = tokens
            if out.finished or w.position >= self.n_ctx:
                finished.append(w)
        if src_rows:
            # positions past a shorter window's own are copied too; its attention never reads them
            self.engine.copy_rows(src_rows, dst_rows, max(w.position for w in windows), cross=False)

    @staticmethod
    def _beam_continuations(windows: list[ActiveWindow], offsets: list[int],
                            logits: Tensor) -> dict[int, tuple[list[list[float]], list[list[int]]]]:
        """Each beam window's rows' k + 1 likeliest continuations, for all beam windows of one
        beam size in one log-softmax, one top-k and one device sync (per window, two syncs each
        cost ~0.2 ms a window-step on a GPU)."""
        by_size: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            if isinstance(w.search, BeamSearch):
                by_size.setdefault(w.n_rows, []).append(i)
        tops: dict[int, tuple[list[list[float]], list[list[int]]]] = {}
        for k, members in by_size.items():
            rows = [offsets[i] + j for i in members for j in range(k)]
            whole = rows == list(range(logits.shape[0]))  # every row is a beam of this size: no gather
            top_lp, top_ids = top_continuations(logits if whole else logits[device_tensor(rows, logits.device)], k + 1)
            for n, i in enumerate(members):
                tops[i] = (top_lp[n * k : (n + 1) * k], top_ids[n * k : (n + 1) * k])
        return tops

    def _release(self, windows: list[ActiveWindow]) -> None:
        for w in windows:
            for r in w.rows:
                self.owner[r] = None
        self._compact()

    def _compact(self) -> None:
        """Move the last windows down into free runs so the decoded span stays dense."""
        while self.active:
            tail = max(self.active, key=lambda w: w.start)
            target = first_fit([w is not None for w in self.owner], tail.n_rows, before=tail.start)
            if target is None:
                return
            dst = list(range(target, target + tail.n_rows))
            if self.engine.cross_in_first_row:
                self.engine.copy_rows(list(tail.rows), dst, tail.position, cross=False)
                self.engine.copy_rows([tail.start], [target], 0, cross=True)
            else:
                self.engine.copy_rows(list(tail.rows), dst, tail.position, cross=True)
            for r in tail.rows:
                self.owner[r] = None
            tail.start = target
            for r in tail.rows:
                self.owner[r] = tail

    def _finish(self, windows: list[ActiveWindow]) -> list[tuple[WindowTask, WindowResult]]:
        results = []
        for w in windows:
            threshold = w.task.options.compression_ratio_threshold
            if isinstance(w.search, SamplingSearch) and threshold is not None:
                best = w.search.best(not_repetitive(self.tokenizer, threshold))
            else:
                best = w.search.best()
            tokens = best.tokens
            results.append((w.task, WindowResult(
                tokens=tokens,
                sum_logprob=best.sum_logprob,
                avg_logprob=best.sum_logprob / (len(tokens) + 1),
                no_speech_prob=w.no_speech_prob,
                temperature=w.task.options.temperature,
                language=w.language,
                language_probs=w.language_probs,
                prompt_length=len(w.prompt),
                prompt_tokens=list(w.prompt),
                audio_features=w.audio_features,
            )))
        if windows:
            self._release(windows)
        return results

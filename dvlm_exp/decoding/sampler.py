"""Masked-diffusion sampling with LLaDA / LLaDA-V semantics (`generate_with_embeds`).

Per block of `block_length` answer slots, `steps // num_blocks` forwards; each forward
commits the top-k masked slots of the current block by confidence, k from an even split of
the block's masks over its steps (remainder to the first steps). Confidence is the float64
softmax probability of the argmax token (`low_confidence`) or a uniform draw (`random`);
temperature adds Gumbel-max noise in float64. EOS / BOS / header ids are banned at masked
slots. Stop sequences are searched in the generated ids after every step; once one is found
nothing after it is committed and the answer is cut at its first match.

Random draws follow the official code's shapes and order, so seeded runs reproduce it:
`torch.rand((1, L))` per forward for `random` remasking and `torch.rand_like` on a
`(1, L, V)` float64 tensor per forward when temperature > 0 (drawn in chunks; only the
answer rows are kept). L is the current sequence length, V the LM-head rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm_exp.engine.state import Sequence

_NOISE_CHUNK = 1 << 22


@dataclass
class SamplerConfig:
    gen_length: int = 32
    block_length: int = 32
    steps: int = 16
    temperature: float = 0.0
    remasking: str = "low_confidence"
    noise: str = "official"  # "official": draw noise with the official shapes; "answer": answer rows only
    # LM-head rows per step. "all": every answer slot (bit parity with the official loop, which
    # takes logits for the whole sequence; on CPU BLAS fewer rows can round differently).
    # "needed": only the rows whose argmax / confidence can matter (masked, before the block end
    # or stop): same answers up to last-bit rounding, ~half the head FLOPs over a block.
    head_rows: str = "all"

    def validate(self) -> None:
        if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
            raise ValueError("gen_length, block_length and steps must be positive")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} must be divisible by block_length={self.block_length}"
            )
        nb = self.gen_length // self.block_length
        if self.steps % nb:
            raise ValueError(f"steps={self.steps} must be divisible by the number of blocks ({nb})")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking must be low_confidence or random, got {self.remasking!r}")
        if self.head_rows not in ("all", "needed"):
            raise ValueError(f"head_rows must be all or needed, got {self.head_rows!r}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length


def num_transfer_tokens(n_masked: int, steps: int) -> list[int]:
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def find_stop(ids: list[int], stop_seqs: list[list[int]], current: int | None) -> int | None:
    """Earliest stop position, scanning stop sequences the way the official loop does.

    Official quirk kept: once a stop has been found (now or in an earlier step) the scan ends
    after the first stop sequence, and each sequence only reports its first match.
    """
    found = current
    for seq in stop_seqs:
        n = len(seq)
        for start in range(len(ids) - n + 1):
            if ids[start : start + n] == seq:
                if found is None or start < found:
                    found = start
                break
        if found is not None:
            break
    return found


def _decode_rows(is_mask: torch.Tensor, limit: int, k: int) -> torch.Tensor:
    """Answer rows whose argmax and confidence can matter this step.

    Only masked slots before `limit` get a finite confidence, and top-k picks nothing else
    unless k exceeds their number (after a stop): then every row is decoded. Argmax, float64
    softmax and noise are per row, so decoding a subset equals decoding all rows and masking.
    """
    rows = torch.nonzero(is_mask[:limit]).squeeze(1)
    if k > rows.numel():
        rows = torch.arange(is_mask.numel(), device=is_mask.device)
    return rows


class MaskedDiffusionSampler:
    def __init__(self, cfg: SamplerConfig, banned_ids: list[int]):
        cfg.validate()
        self.cfg = cfg
        self.banned_ids = list(banned_ids)

    def _gumbel_argmax(self, logits: torch.Tensor, rows: torch.Tensor, n_answer: int, seq_len: int,
                       answer_offset: int) -> torch.Tensor:
        """argmax of exp(logits)/(-log u)^T for the answer rows `rows` (`logits` holds just those
        rows), with u drawn for all `n_answer` answer rows as the official code draws it."""
        T = self.cfg.temperature
        vocab = logits.shape[1]
        if self.cfg.noise == "official":
            # The official code draws (1, seq_len, V) float64 uniforms; skip the rows we do not use.
            skip = answer_offset * vocab
            while skip > 0:
                n = min(skip, _NOISE_CHUNK)
                torch.rand(n, dtype=torch.float64)
                skip -= n
            u = torch.rand(n_answer * vocab, dtype=torch.float64).view(n_answer, vocab)
            tail = (seq_len - answer_offset - n_answer) * vocab
            while tail > 0:
                n = min(tail, _NOISE_CHUNK)
                torch.rand(n, dtype=torch.float64)
                tail -= n
        else:
            u = torch.rand(n_answer, vocab, dtype=torch.float64)
        if rows.numel() != n_answer:
            u = u[rows]
        noisy = logits.to(torch.float64).exp() / (-torch.log(u)) ** T
        return noisy.argmax(dim=-1)

    @torch.inference_mode()
    def generate(self, engine, seq: Sequence, stop_seqs: list[list[int]] | None = None,
                 trace: list | None = None) -> tuple[list[int], Sequence]:
        """Returns the answer ids (cut at the first stop) and the final (possibly pruned) state."""
        cfg = self.cfg
        G = cfg.gen_length
        steps_per_block = cfg.steps // cfg.num_blocks
        stop_seqs = [s for s in (stop_seqs or []) if s]
        stop_pos: int | None = None
        step = 0
        ids = seq.response_ids.clone()
        seq.response_ids = ids
        mask_id = seq.mask_id
        if hasattr(engine, "begin_sample"):
            engine.begin_sample(cfg.steps)
        wants_conf = getattr(engine, "wants_confidence", False)
        for b in range(cfg.num_blocks):
            lo, hi = b * cfg.block_length, (b + 1) * cfg.block_length
            if stop_pos is not None and stop_pos <= lo:
                break
            k_per_step = num_transfer_tokens(int((ids[lo:hi] == mask_id).sum()), steps_per_block)
            for i in range(steps_per_block):
                is_mask = ids == mask_id
                if stop_pos is not None and not bool(is_mask[:stop_pos].any()):
                    break
                if not bool(is_mask[lo:hi].any()):
                    break
                seq_len_before = seq.length
                answer_offset = seq_len_before - G
                limit = stop_pos if stop_pos is not None else hi
                k = k_per_step[i]
                rows = _decode_rows(is_mask, limit, k)
                head = torch.arange(G, device=ids.device) if cfg.head_rows == "all" else rows
                out = engine.forward(seq, step, head)
                if out.keep is not None:
                    seq = seq.keep_prompt(out.keep, getattr(out, "embeds", None))
                logits = out.logits  # [len(head), V]
                if self.banned_ids:
                    banned = torch.tensor(self.banned_ids, device=logits.device)
                    col = logits[:, banned]
                    logits[:, banned] = torch.where(is_mask[head][:, None], torch.full_like(col, -torch.inf), col)
                logits_rows = logits if head is rows or rows.numel() == G else logits[rows]
                if cfg.temperature > 0:
                    x0_rows = self._gumbel_argmax(logits_rows, rows, G, seq_len_before, answer_offset)
                else:
                    x0_rows = logits_rows.argmax(dim=-1)
                if cfg.remasking == "low_confidence":
                    p = torch.softmax(logits_rows.to(torch.float64), dim=-1)
                    conf_rows = torch.gather(p, -1, x0_rows[:, None]).squeeze(-1)
                else:
                    conf_rows = torch.rand((1, seq_len_before), device=ids.device)[0, answer_offset:][rows].to(torch.float64)
                x0 = ids.clone()
                x0[rows] = x0_rows
                conf = torch.full((G,), -torch.inf, dtype=torch.float64, device=ids.device)
                conf[rows] = conf_rows
                conf[limit:] = -torch.inf
                conf = torch.where(is_mask, conf, torch.full_like(conf, -torch.inf))
                if k > 0:
                    sel = torch.topk(conf, k=k).indices
                    # As the official loop: a selected slot that is not masked keeps its token
                    # (possible only after a stop, when fewer masked slots than k remain).
                    ids[sel] = torch.where(is_mask[sel], x0[sel], ids[sel])
                    if trace is not None:
                        trace.append(sorted(sel.tolist()))
                seq.response_ids = ids
                if wants_conf and rows.numel():
                    c = (conf_rows if cfg.remasking == "low_confidence" and cfg.temperature == 0
                         else torch.softmax(logits_rows.to(torch.float64), dim=-1).amax(-1))
                    engine.observe(step, float(c.mean()))
                if hasattr(engine, "after_step"):
                    upd = engine.after_step(seq, step)
                    if upd is not None:
                        seq = seq.keep_prompt(*upd)
                step += 1
                if stop_seqs:
                    stop_pos = find_stop(ids.tolist(), stop_seqs, stop_pos)
        end = stop_pos if stop_pos is not None else G
        return ids[:end].tolist(), seq

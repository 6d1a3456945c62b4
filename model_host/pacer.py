"""How much prompt work each step may carry, so that the streams already running keep their pace.

A step decodes every running row, then admits new prompts within a prefill budget. The budget is
what trades the two latencies a user feels: a large one starts newcomers sooner (time to first
token) but makes every running stream wait for that step's prefill (inter-token latency); a small
one does the opposite. A fixed budget is right for one load only: the same 256 tokens cost a
third of a step beside a small batch and twice the step beside a large one, or on a slower
(shared, throttled) machine.

With a step target (``--step-target-ms``) the budget is sized each step from what the last steps
measured: the decode time of the running rows and the seconds a token of prompt work took. A step
that decodes running rows gets ``(target - decode) / seconds_per_token`` tokens, within
``[floor, cap]``; a step with no running row has no stream to hold up and gets the cap (the
configured budget). The floor keeps newcomers moving when decoding alone fills the target. The
estimates are moving averages, so a load that shifts is followed within a few steps.

Tensor parallel ranks must take identical decisions, which a clock cannot give: there the budget
stays fixed (``cli.preflight`` refuses a step target with ``--tp``).
"""

from __future__ import annotations

_SMOOTHING = 0.3  # weight of the newest measurement in the moving averages
_MIN_MEASURED_TOKENS = 8  # admissions smaller than this say more about overhead than about tokens


class StepPacer:
    def __init__(self, cap_tokens: int, target_s: float = 0.0) -> None:
        self.cap_tokens = cap_tokens
        self.target_s = target_s
        self.floor_tokens = max(1, min(cap_tokens, max(16, cap_tokens // 8)))
        self.decode_s: float | None = None  # recent decode time of the running rows
        self.s_per_token: float | None = None  # recent cost of a token of prompt work

    @property
    def adaptive(self) -> bool:
        return self.target_s > 0

    def budget_tokens(self, decoding: bool) -> int:
        """This step's prefill budget; ``decoding``: rows are running (and decoded this step)."""
        if not self.adaptive or not decoding or self.decode_s is None or self.s_per_token is None:
            return self.cap_tokens
        room_s = self.target_s - self.decode_s
        fits = int(room_s / self.s_per_token) if room_s > 0 else 0
        return max(self.floor_tokens, min(self.cap_tokens, fits))

    def observe(self, decode_s: float, decoded: bool, admit_s: float, work_tokens: int) -> None:
        """What the step just measured: its decode (when rows ran) and its admission's time and
        tokens of computation."""
        if decoded:
            self.decode_s = _average(self.decode_s, decode_s)
        if work_tokens >= _MIN_MEASURED_TOKENS:
            self.s_per_token = _average(self.s_per_token, admit_s / work_tokens)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * new

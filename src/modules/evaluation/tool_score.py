"""The composite tool-use reward of the GRPO baseline (the paper's comparison): format plus answer.

    score = format_weight * [every tool call well formed and a final answer stated]
          + answer_weight * [the final answer is correct]

A hand-designed reward of the kind REOPOLD replaces with the teacher's log-ratio. Used as the grader of
``OutcomeReward`` (``reward=tool_composite``), which group-normalises it.
"""

from __future__ import annotations

from src.modules.evaluation.grading import extract_answer, is_correct
from src.tools.calls import ToolCallError, parse_tool_calls


class CompositeToolScore:
    """``(response, reference) -> float``; ``response`` is the episode's sampled text, all turns."""

    def __init__(self, format_weight: float = 0.2, answer_weight: float = 1.0):
        self.format_weight, self.answer_weight = format_weight, answer_weight

    def __call__(self, response: str, reference: str) -> float:
        calls = parse_tool_calls(response)
        well_formed = not any(isinstance(c, ToolCallError) for c in calls)
        final = response.rsplit("</tool_call>", 1)[-1]
        answered = extract_answer(final) is not None
        correct = is_correct(final, reference)
        return self.format_weight * float(well_formed and answered) + self.answer_weight * float(correct)

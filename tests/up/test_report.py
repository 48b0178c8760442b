"""What `opd up` prints about a run: the evaluation line with every measure, and the marked samples table."""

from __future__ import annotations

from rich.console import Console

from opd.tasks.short_answer import content, correct, verify
from opd.up.report import eval_line, samples_table, step_line


def test_the_eval_line_names_every_measure_after_the_verifiers_accuracy() -> None:
    record = {"kind": "eval", "step": 4, "teacher_kl": 0.7126, "accuracy": 0.766, "accuracy_correct": 0.203,
              "accuracy_content": 0.312, "time_eval": 3.0}
    line = eval_line(record)
    assert "teacher KL on held-out prompts 0.7126, accuracy 0.766, correct 0.203, content 0.312 (step 4)" in line
    assert "accuracy" not in eval_line({"step": 0, "teacher_kl": 0.5}), "no verifier, no accuracy"
    assert "accuracy 0.125" in step_line({"step": 1, "train_accuracy": 0.125, "train_accuracy_correct": 0.0})


def test_the_step_and_eval_lines_lead_with_the_kl_per_completion_beside_the_mean_per_token() -> None:
    record = {"kind": "eval", "step": 4, "teacher_kl": 0.7126, "teacher_kl_per_completion": 4.1331, "mean_length": 5.8,
              "accuracy": 0.766, "accuracy_content": 0.312}
    assert eval_line(record) == ("[cyan]eval    teacher KL on held-out prompts 4.133 per completion, 0.7126 per token "
                                 "(mean length 5.8), accuracy 0.766, content 0.312 (step 4)[/cyan]")
    step = {"kind": "train", "step": 3, "teacher_kl": 0.8057, "teacher_kl_per_completion": 10.1, "train_accuracy": 0.156,
            "entropy": 2.624, "tokens": 402, "mean_length": 12.5625, "time_sample": 5.9, "time_score": 11.9}
    assert step_line(step) == ("step   3  teacher KL 10.100 per completion, 0.8057 per token  accuracy 0.156  "
                               "entropy 2.624  tokens 402  mean length 12.6  (sample 5.9s, score 11.9s)")
    assert step_line({"step": 1, "teacher_kl": 0.5}) == "step   1  teacher KL 0.5000", "records of before: per token alone"
    assert "teacher KL" not in step_line({"step": 1, "tokens": 5}), "the rl and sft arms ask no teacher while training"


def test_the_samples_table_marks_each_reply_and_shows_the_reference() -> None:
    rows = [{"prompt": "What is the capital of Thailand?", "answer": "Bangkok"},
            {"prompt": "What is 11 plus 5?", "answer": "16"}]
    table = samples_table(rows, ["The capital of Thailand is Bangkok.", "11 + [5] = 6."], ["Bangaklesaraya", "16"],
                          {"verifier": verify, "correct": correct, "content": content})
    console = Console(width=200, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "answer" in text and "Bangkok" in text and "11 + [5] = 6." in text, "replies are shown as written"
    assert "verifier ✗  correct ✗  content ✓" in text  # the sentence that has the fact
    assert "verifier ✓  correct ✗  content ✗" in text  # the bare word that lost it
    assert "verifier ✓  correct ✓  content ✓" in text
    plain = samples_table(rows, ["a", "b"], ["c", "d"])
    assert [c.header for c in plain.columns] == ["prompt", "answer", "before", "after"]


def test_several_teachers_show_their_own_kl_at_each_evaluation_and_before_and_after(tmp_path) -> None:
    import json

    from opd.up.report import end_summary

    record = {"kind": "eval", "step": 2, "teacher_kl": 0.5, "teacher_kl/math": 0.25, "teacher_kl/style": 0.75,
              "accuracy": 0.5, "accuracy/math": 1.0, "accuracy/style": 0.0}
    line = eval_line(record)
    assert "0.5000, accuracy 0.500; per teacher: math 0.2500 (accuracy 1.000); style 0.7500 (accuracy 0.000) (step 2)" in line
    single = {"kind": "eval", "step": 2, "teacher_kl": 0.5}
    assert eval_line(single) == "[cyan]eval    teacher KL on held-out prompts 0.5000 (step 2)[/cyan]", "unchanged"
    both = {**record, "teacher_kl_per_completion": 2.0, "teacher_kl_per_completion/math": 0.5,
            "teacher_kl_per_completion/style": 3.5}
    assert ("per teacher: math 0.500 per completion, 0.2500 per token (accuracy 1.000); "
            "style 3.500 per completion, 0.7500 per token (accuracy 0.000) (step 2)") in eval_line(both)
    out = tmp_path / "run"
    out.mkdir()
    records = [{"kind": "eval", "step": 0, "teacher_kl": 0.7, "teacher_kl/math": 0.5, "teacher_kl/style": 0.9,
                "accuracy/math": 0.25},
               {"kind": "train", "step": 1}, {"kind": "train", "step": 2}, record]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = end_summary(out, 2, {"trainer": 0})
    assert lines[0] == "steps completed: 2 of 2"
    assert lines[3:] == ["teacher KL on held-out prompts, step 0 -> step 2: 0.7000 -> 0.5000",
                         "teacher KL on held-out prompts per teacher, step 0 -> step 2:",
                         "  math: 0.5000 -> 0.2500  (accuracy 0.250 -> 1.000)", "  style: 0.9000 -> 0.7500"]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ({"kind": "train", "step": 1}, single)))
    assert end_summary(out, 2, {"trainer": 0})[3:] == ["teacher KL on held-out prompts at step 2: 0.5000"], "one teacher"
    first = {"kind": "eval", "step": 0, "teacher_kl": 0.9, "teacher_kl_per_completion": 13.68, "mean_length": 15.2}
    last = {"kind": "eval", "step": 12, "teacher_kl": 1.0, "teacher_kl_per_completion": 5.4, "mean_length": 5.4}
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (first, {"kind": "train", "step": 1}, last)))
    assert end_summary(out, 12, {"trainer": 0})[3:] == [
        "teacher KL on held-out prompts, step 0 -> step 12: 13.680 -> 5.400 per completion, 0.9000 -> 1.0000 per token; "
        "mean length 15.2 -> 5.4 tokens"], "the KL of a whole reply falls while the mean per token rises"

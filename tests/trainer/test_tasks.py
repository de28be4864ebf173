import json

import pytest

from srpo.tasks import Arithmetic, JsonlDataset, get_verifier, load_task, mcq, numeric, toolcall


def test_numeric_tolerates_surrounding_text():
    assert numeric("Let me think... 12 + 7 = 19. The answer is 19.", 19) == 1.0
    assert numeric("The answer is 1,234", 1234) == 1.0
    assert numeric("It is 18", 19) == 0.0
    assert numeric("no idea", 19) == 0.0
    assert numeric("-3", -3) == 1.0
    # A dataset answer written "1,234" raised (a verifier error: reward 0 for every rollout); ".5" read as 5.
    assert numeric("1234", "1,234") == 1.0
    assert numeric("It is .5", 0.5) == 1.0 and numeric("It is -.5", -0.5) == 1.0
    assert numeric("So 2. Done", 2) == 1.0 and numeric("About 1.5e3", 1500) == 1.0
    assert numeric("5-3=2", 2) == 1.0 and numeric("2 eggs", 2) == 1.0
    # Compared within 1e-6 absolute, 2e-9 was 1e-9 and 20! + 1 was 20! (floats hold integers to 2^53 only).
    assert numeric("2e-9", 1e-9) == 0.0 and numeric("1.0000000001e-9", 1e-9) == 1.0
    assert numeric("2432902008176640001", 2432902008176640000) == 0.0
    assert numeric("2432902008176640000", "2,432,902,008,176,640,000") == 1.0
    assert numeric("0.3", 0.1 + 0.2) == 1.0 and numeric("4", 4.0) == 1.0 and numeric("0", 0) == 1.0


def test_mcq_and_toolcall():
    assert mcq("I think the answer is (B).", "B") == 1.0
    assert mcq("A or maybe C", "A") == 0.0
    assert mcq("It is B", "(B)") == 1.0 and mcq("It is B", "b.") == 1.0  # "(B)" was compared as a string: always 0
    with pytest.raises(ValueError, match="must be a letter A-D"):
        mcq("It is B", "Paris")
    resp = "Thought: look it up\nAction: search\nAction Input: {\"q\": \"cats\"}\n"
    assert toolcall(resp, {"action": "search", "action_input": {"q": "cats"}}) == 1.0
    assert toolcall(resp, {"action": "lookup", "action_input": {"q": "cats"}}) == 0.0
    assert toolcall("Action: search", {"action": "search", "action_input": "x"}) == 0.0
    # The same JSON written without spaces scored 0 (compared with json.dumps's text)
    compact = "Action: search\nAction Input: {\"q\":\"cats\"}"
    assert toolcall(compact, {"action": "search", "action_input": {"q": "cats"}}) == 1.0
    assert toolcall(compact, {"action": "search", "action_input": '{"q": "cats"}'}) == 1.0
    assert toolcall(compact, {"action": "search", "action_input": {"q": "dogs"}}) == 0.0
    assert toolcall("Action: say\nAction Input: hello", {"action": "say", "action_input": "hello"}) == 1.0


def test_arithmetic_answers_are_right():
    task = Arithmetic(digits=2, ops="+-*", seed=3)
    for ex in task.sample(50):
        a, op, b = ex.prompt.split()[2:5]
        assert ex.answer == eval(f"{a}{op}{b.rstrip('?')}")


def test_module_function_verifier_and_unknown_name():
    assert get_verifier("coin_verifier:coin")("ab", None) in (0.0, 1.0)
    with pytest.raises(ValueError, match="verifier"):
        get_verifier("nope")
    with pytest.raises(ValueError, match="verifier 'no_such_module:f': ModuleNotFoundError"):
        get_verifier("no_such_module:f")
    with pytest.raises(ValueError, match="verifier 'coin_verifier:nope': AttributeError"):
        get_verifier("coin_verifier:nope")


def test_verifier_for_a_task_with_its_own_is_refused():
    with pytest.raises(ValueError, match="verifier 'mcq' applies to JSONL tasks only"):
        load_task("arithmetic", "mcq")


def test_malformed_dataset_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": 1}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed"):
        JsonlDataset(str(path), "numeric")
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*answer"):
        JsonlDataset(str(path), "numeric")
    path.write_text(json.dumps({"prompt": "a", "answer": 1, "feedback": "wrong sign"}) + "\n")
    with pytest.warns(UserWarning, match="1 line.* \"feedback\" field, which the trainer does not use"):
        JsonlDataset(str(path), "numeric")  # it was read into the examples, and nothing used it
    # a chat-format prompt: its str() became the prompt's text
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "2+2?"}], "answer": 4}) + "\n")
    with pytest.raises(ValueError, match=r'bad\.jsonl:1: .*"prompt" must be the text of the user turn, got list'):
        JsonlDataset(str(path), "numeric")


def test_jsonl_evaluation_holds_out_lines_that_training_never_draws(tmp_path):
    """The held-out prompts were drawn from the same lines as training's: the evaluation measured recall."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(20)))
    train, held_out, _ = load_task(str(path), "numeric", seed=3, eval_prompts=5)
    assert len({e.prompt for e in held_out}) == 5
    assert {e.prompt for e in train.sample(2000)} == {f"q{i}" for i in range(20)} - {e.prompt for e in held_out}
    assert load_task(str(path), "numeric", seed=4, eval_prompts=5)[1] == held_out  # the same lines for every seed
    with pytest.raises(ValueError, match=r"data\.jsonl: 20 example\(s\), and evaluation holds out 20 "
                                         r"\(--eval-prompts\): none would be left to train on"):
        load_task(str(path), "numeric", eval_prompts=20)


def test_parity_task_passes_about_half_and_replays_from_its_state():
    from srpo.tasks import Parity, parity

    assert [parity(t, None) for t in ("a", "b", "ab")] == [0.0, 1.0, 0.0]  # 97 odd, 98 even, 195 odd
    task = Parity(seed=3)
    state = task.state()
    first = task.sample(4)
    task.set_state(state)
    assert task.sample(4) == first


def test_final_answer_takes_the_last_tag_else_the_last_line():
    from srpo.tasks import final_answer

    assert final_answer("<answer>3</answer> no, <answer> 4 </answer>") == "4"
    assert final_answer("thinking\n  7 \n\n") == "7"
    assert final_answer("") == ""


def test_math_verify_compares_as_mathematics():
    pytest.importorskip("math_verify", reason="math-verify is the optional extra [tasks]")
    verify = get_verifier("math-verify")
    assert verify(r"So the answer is $\frac{1}{2}$.", "0.5") == 1.0
    assert verify("so it is 4", 3) == 0.0


def test_reasoning_gym_task_is_seeded_and_scored_by_its_dataset():
    pytest.importorskip("reasoning_gym", reason="reasoning-gym is the optional extra [tasks]")
    from srpo.tasks import load_task

    train, held_out, verify = load_task("reasoning-gym:basic_arithmetic", "numeric", seed=5)
    again, _, _ = load_task("reasoning-gym:basic_arithmetic", "numeric", seed=5)
    first = train.sample(3)
    assert [e.prompt for e in first] == [e.prompt for e in again.sample(3)]
    assert [e.prompt for e in first] != [e.prompt for e in held_out[:3]]
    entry = first[0].answer
    assert verify(f"Let me see.\n<answer>{entry['answer']}</answer>", entry) == 1.0
    assert verify("<answer>not a number</answer>", entry) == 0.0
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'nope'"):
        load_task("reasoning-gym:nope", "numeric")


def test_missing_optional_task_packages_are_named(monkeypatch):
    import sys

    from srpo.tasks import load_task

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ValueError, match=r"reasoning-gym package: pip install 'srpo-kernels\[tasks\]'"):
        load_task("reasoning-gym:basic_arithmetic", "numeric")
    with pytest.raises(ValueError, match="math-verify package"):
        get_verifier("math-verify")

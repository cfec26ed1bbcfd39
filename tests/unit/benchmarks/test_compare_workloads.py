"""Workloads of `python -m benchmarks.compare` on a tokenizer trained here, tiny text and a tiny LLaMA: identical
models and batches, prompt masking, evaluation against a plain reference, exact-match scoring against greedy
generation, the compact vocabulary."""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.compare import workloads as wl
from benchmarks.compare.workloads import (Problem, Size, answer_exact_match, compact_vocabulary, encode_problem,
                                          finetune_workload, pretrain_workload)

TEXT = [
    "The for statement in Python iterates over the items of any sequence, in the order that they appear.",
    "A list comprehension consists of brackets containing an expression followed by a for clause.",
    "Exceptions are raised when something goes wrong; a try statement can handle them and clean up.",
    "Modules are files containing Python definitions and statements; the file name is the module name.",
]
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}")
PROBLEMS = [Problem(f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                    f"Tom has {a} + {b} = {a + b} apples.\n#### {a + b}", str(a + b))
            for a, b in [(3, 4), (12, 30), (7, 8), (21, 21), (5, 9), (40, 2), (16, 16), (9, 1)]]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 10 + [p.question + p.solution for p in PROBLEMS] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT
    return fast


@pytest.fixture
def text_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path / "cache"))   # build_data's token cache stays in the test
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(TEXT):
        (folder / f"doc{i}.txt").write_text((text + " ") * 6, encoding="utf-8")
    return folder


PRE = Size(seq_len=16, rows=3, accum=2, eval_rows=4, eval_batch_rows=3, hidden=32, layers=2, heads=4, kv_heads=2,
           intermediate=48)


def tiny_llama(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=True))


def reference_loss(model, ids, labels):
    """Mean next-token NLL over all label tokens of all rows, full width, one batch."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item()


def test_compact_vocabulary_is_an_order_preserving_relabelling():
    a, b = torch.tensor([[5, 9, 5], [300, -100, 9]]), torch.tensor([[42, 5]])
    lookup, vocab = compact_vocabulary(a, b, multiple=8)
    assert vocab == 8 and lookup.shape == (301,)
    seen = [5, 9, 42, 300]
    assert [int(lookup[i]) for i in seen] == [0, 1, 2, 3]
    assert int((lookup >= 0).sum()) == 4 and int(lookup[6]) == -1


def test_pretrain_models_batches_and_evaluation_are_deterministic(tokenizer, text_dir):
    w = pretrain_workload(tokenizer=tokenizer, data_path=str(text_dir), size=PRE, device=torch.device("cpu"),
                          seed=3)
    m1, m2 = w.make_model(), w.make_model()
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    with torch.no_grad():
        next(m1.parameters()).add_(1.0)                   # copies are independent
    assert all(torch.equal(w.make_model().state_dict()[k], s2[k]) for k in s2)
    again = pretrain_workload(tokenizer=tokenizer, data_path=str(text_dir), size=PRE, device=torch.device("cpu"),
                              seed=3)
    for step in (0, 1, 7):
        batches = w.train_batches(step)
        assert len(batches) == PRE.accum and w.tokens_per_step == PRE.rows * PRE.seq_len * PRE.accum
        for b, c, d in zip(batches, w.train_batches(step), again.train_batches(step)):
            assert b["input_ids"].shape == (PRE.rows, PRE.seq_len)
            assert torch.equal(b["input_ids"], c["input_ids"]) and torch.equal(b["input_ids"], d["input_ids"])
            assert torch.equal(b["labels"], b["input_ids"])
            assert int(b["input_ids"].max()) < m2.config.vocab_size and int(b["input_ids"].min()) >= 0
    assert not torch.equal(w.train_batches(0)[0]["input_ids"], w.train_batches(1)[0]["input_ids"])
    first, second = w.evaluate(m2), w.evaluate(m2)
    assert first == second and set(first) == {"eval_loss", "perplexity"}
    assert math.isclose(first["perplexity"], math.exp(first["eval_loss"]), rel_tol=1e-9)
    assert m2.training                                     # evaluate restores the mode
    with pytest.raises(ValueError, match="no learning rate"):
        w.lr_for("nonsense")
    assert w.lr_for("galore") > w.lr_for("full")


def test_pretrain_evaluation_matches_a_plain_reference(tokenizer, text_dir):
    from launch.data import build_data

    w = pretrain_workload(tokenizer=tokenizer, data_path=str(text_dir), size=PRE, device=torch.device("cpu"),
                          seed=3)
    model = w.make_model()
    # the same held-out rows, relabelled with the same compact vocabulary, scored in one full-width batch
    cfg = type("Cfg", (), {"path": str(text_dir), "pack": True, "eval_fraction": 0.05,
                           "eval_max_sequences": PRE.eval_rows})()
    data = build_data(cfg, tokenizer, seq_len=PRE.seq_len, seed=3, cache_dir=None)
    lookup, _ = compact_vocabulary(data.train, data.eval)
    ids = lookup[data.eval]
    assert math.isclose(w.evaluate(model)["eval_loss"], reference_loss(model, ids, ids), rel_tol=1e-5)


def test_batches_follow_the_sequential_sampler_stream():
    from launch.data import BatchSampler

    n, size = 7, Size(seq_len=2, rows=3, accum=2, eval_rows=1)
    ids = torch.arange(n * 2).view(n, 2)
    source = wl._batch_source(ids, ids, size, seed=11, device=torch.device("cpu"))
    sampler = BatchSampler(n, size.rows, 11)
    stream = [ids[sampler.next_batch()] for _ in range(10)]                   # micro-batches in order
    for step in (4, 0, 2, 3, 1):                                              # any order of access
        got = [b["input_ids"] for b in source(step)]
        assert all(torch.equal(g, s) for g, s in zip(got, stream[2 * step:2 * step + 2]))
    with pytest.raises(ValueError, match="step"):
        source(-1)


def test_encode_problem_masks_the_prompt_and_marks_the_answer(tokenizer):
    problem = PROBLEMS[5]
    ids, labels, answer = encode_problem(tokenizer, problem)
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": wl.SYSTEM_PROMPT},
                                            {"role": "user", "content": problem.question}],
                                           tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ids[:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert all(label == -100 for label in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:]) == problem.solution + "</s>"
    answer_ids = [t for t, m in zip(ids, answer) if m]
    assert tokenizer.decode(answer_ids).strip() == "42</s>"
    assert answer[-1] and not any(answer[:n_prompt])


def test_exact_match_on_hand_made_logits():
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    logits = torch.zeros(4, 4, 6)
    for row, predicted in enumerate([[2, 3, 4, 0], [2, 3, 5, 0], [9, 9, 4, 0], [2, 3, 4, 0]]):
        for t, token in enumerate(predicted):
            if token < 6:
                logits[row, t, token] = 1.0
    # row 0: both answer tokens right; row 1: last one wrong; row 2: only its answer token matters (right);
    # row 3: no answer tokens -> not a match
    assert answer_exact_match(logits, ids, mask).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="position 0"):
        answer_exact_match(logits, ids, torch.ones(4, 4, dtype=torch.bool))


def test_finetune_exact_match_equals_greedy_generation(tokenizer):
    size = Size(seq_len=96, rows=2, accum=1, eval_rows=2, eval_batch_rows=2)
    model = tiny_llama(tokenizer)
    # memorise PROBLEMS[0] so that one held-out row is a match and the other (unseen numbers) is not
    ids, labels, _ = encode_problem(tokenizer, PROBLEMS[0])
    x, y = torch.tensor([ids]), torch.tensor([labels])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    w = finetune_workload(model=model, tokenizer=tokenizer, train_problems=PROBLEMS[2:],
                          eval_problems=PROBLEMS[2:3] + PROBLEMS[:2],        # a training problem is never evaluated
                          size=size, device=torch.device("cpu"), seed=0, source="test")
    result = w.evaluate(w.make_model())
    # reference: greedy generation from the gold solution up to the answer, compared with the gold answer tokens
    matches = 0
    twin = w.make_model().eval()
    for problem in PROBLEMS[:2]:
        ids, labels, answer = encode_problem(tokenizer, problem)
        start = answer.index(True)
        with torch.no_grad():
            for t in range(start, len(ids)):
                nxt = int(twin(input_ids=torch.tensor([ids[:t]])).logits[0, -1].argmax())
                if nxt != ids[t]:
                    break
            else:
                matches += 1
    assert result["exact_match"] == matches / 2 == 0.5
    # eval loss over the solution tokens of both rows, full width
    rows = [encode_problem(tokenizer, p) for p in PROBLEMS[:2]]
    width = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    assert math.isclose(result["eval_loss"], reference_loss(twin, ids, labels), rel_tol=1e-5)
    # training batches: prompt tokens carry no loss, every row has some
    for step in range(3):
        for b in w.train_batches(step):
            assert b["input_ids"].shape == (2, 96)
            assert torch.all((b["labels"] == -100) | (b["labels"] == b["input_ids"]))
            assert torch.all((b["labels"] != -100).any(dim=1)) and torch.all(b["labels"][:, :10] == -100)


def test_finetune_drops_problems_longer_than_seq_len(tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        finetune_workload(model=tiny_llama(tokenizer), tokenizer=tokenizer, train_problems=PROBLEMS,
                          eval_problems=PROBLEMS, size=Size(seq_len=8, rows=1, accum=1, eval_rows=1),
                          device=torch.device("cpu"), seed=0, source="test")


def test_gsm_symbolic_problems_are_seeded_and_end_with_the_answer():
    pytest.importorskip("reasoning_gym")
    a, b = wl.gsm_symbolic_problems(5, 12), wl.gsm_symbolic_problems(5, 12)
    assert a == b and len(a) >= 8
    assert a != wl.gsm_symbolic_problems(6, 12)
    for p in a:
        assert p.solution.rstrip().endswith(f"#### {p.answer}") and p.question


def test_unknown_workload():
    with pytest.raises(ValueError, match="pretrain"):
        wl.get_workload("bogus", quick=True, device="cpu", seed=0)

"""Gate training (sglang_evict.training) on a tiny randomly initialised Llama: the student equals
the teacher at β = 1, training lowers the loss and pulls the live count towards M, resume is
exact, and the exported checkpoint is the trained gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sglang_evict import training as tr
from sglang_evict.gates.checkpoint import load_gates, read_gate_header
from sglang_evict.gates.files import load_gates_for_model
from sglang_evict.gates.modules import GateConfig, RetentionGates

LENGTH = 192  # tokens per training sequence: enough for the chat template and a needle


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, default_model_path):
    """2 layers, hidden 64, 4 query / 2 KV heads, the default model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(model_dir: Path, out_dir: Path, **overrides) -> tr.TrainConfig:
    values = dict(
        model=str(model_dir), out_dir=str(out_dir), lengths=[LENGTH],
        tasks=["niah_single_1", "essay"], budget=8, gate_hidden=16, bias_init=3.0,
        steps=4, lr=0.05, warmup_steps=0, checkpoint_every=100, progress=False,
        loss_chunk=64, attn_chunk=64, dtype="fp32", answer_only=False, kl_weight=1.0,
        ce_weight=1.0,
    )
    values.update(overrides)
    return tr.load_config(None, values)


def _loss_and_full_logits(trainer, ids, config, start):
    """forward_backward's losses and gate gradients (the gradients then cleared), and the
    teacher's and student's next-token log-probabilities from the full logits."""
    got = tr.forward_backward(trainer.model, trainer.attachment, ids, config, answer_start=start)
    grads = {n: p.grad.clone() for n, p in trainer.gates.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        logp_t = torch.log_softmax(trainer.model(input_ids=ids, use_cache=False).logits[0, :-1], -1)
    logp_s = torch.log_softmax(tr.student_logits(trainer.model, trainer.attachment, ids)[0, :-1], -1)
    return got, grads, logp_t, logp_s


def test_student_equals_teacher_when_beta_is_one(tiny_model_dir):
    model = tr.load_base_model(tiny_model_dir)
    # z = 1e4 makes logsigmoid(z) exactly 0 in float32: β = 1, nothing decays.
    gates = RetentionGates(
        GateConfig.from_hf_config(model.config, gate_hidden=4, bias_init=1e4), init_std=0.0
    )
    attachment = tr.GateAttachment(model, gates)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher = model(input_ids=ids, use_cache=False).logits
        student = tr.student_logits(model, attachment, ids)
    assert all(bool((lb == 0).all()) for lb in attachment.log_betas)
    assert model.config._attn_implementation == "sdpa"  # restored after the student
    torch.testing.assert_close(student, teacher, rtol=1e-5, atol=1e-5)
    # Decaying gates do change the output.
    lowered = RetentionGates(GateConfig.from_hf_config(model.config, gate_hidden=4, bias_init=0.0))
    with torch.no_grad():
        other = tr.student_logits(model, tr.GateAttachment(model, lowered), ids)
    assert (other - teacher).abs().max() > 1e-3


def test_training_lowers_loss_and_moves_live_count_towards_budget(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path / "run", steps=6, tasks=["niah_single_1"])
    trainer = tr.Trainer(config)
    probe = torch.tensor([trainer.data.sample(1000)["input_ids"]])

    def probe_losses():
        out = tr.forward_backward(trainer.model, trainer.attachment, probe, config)
        trainer.optimizer.zero_grad(set_to_none=True)
        return out

    before = probe_losses()
    assert before.live > 2 * config.budget  # the capacity term is active
    result = trainer.run()
    after = probe_losses()
    assert result["status"] == "completed" and result["step"] == 6
    assert after.total < before.total
    assert after.cap < before.cap
    assert abs(after.live - config.budget) < abs(before.live - config.budget)
    out = Path(config.out_dir)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "kl", "ce", "cap", "live", "lr"} <= set(rows[0])
    assert (out / "log.csv").read_text().startswith("step,loss,kl,ce")
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_hard_eviction_training_reaches_the_gates_and_lowers_the_loss(tiny_model_dir, tmp_path):
    """The student attends over what the server's evictor keeps (DBTrimKV's one budget, a
    shared projection); the soft path's gradient reaches every gate, and training lowers the
    loss the hard student sees."""
    config = _config(tiny_model_dir, tmp_path / "run", steps=6, tasks=["niah_single_1"],
                     hard_eviction=True, eviction_buffer=4, eviction_chunk=64,
                     shared_projection=True, capacity_weight=0.0, lr=0.02)
    trainer = tr.Trainer(config)
    sample = trainer.data.sample(1000)
    probe = torch.tensor([sample["input_ids"]])

    def probe_losses():
        out = tr.forward_backward(trainer.model, trainer.attachment, probe, config,
                                  answer_start=sample["answer_start"])
        grads = {n: p.grad for n, p in trainer.gates.named_parameters()}
        trainer.optimizer.zero_grad(set_to_none=True)
        return out, grads

    before, grads = probe_losses()
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads.values()), [
        n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    soft = tr.forward_backward(trainer.model, trainer.attachment, probe,
                               tr.load_config(None, {**config.to_dict(), "hard_eviction": False}),
                               answer_start=sample["answer_start"])
    trainer.optimizer.zero_grad(set_to_none=True)
    assert before.kl > soft.kl  # 8 of ~190 keys per head survive: the hard student is worse
    assert trainer.run()["status"] == "completed"
    after, _ = probe_losses()
    assert after.total < before.total


@pytest.mark.parametrize("scope", ["head", "global"])
def test_capacity_scope(tiny_model_dir, tmp_path, scope):
    """"head": the hinge per (layer, head), averaged; "global": the hinge on the mean over all
    layers and heads (one shared budget), from the naive expected live count."""
    from sglang_evict.training.gated_attention import expected_live_count_reference

    config = _config(tiny_model_dir, tmp_path / scope, capacity_scope=scope, budget=20,
                     bias_init=2.0, init_std=0.5)
    trainer = tr.Trainer(config)
    ids = torch.tensor([trainer.data.sample(3)["input_ids"]])
    out = tr.forward_backward(trainer.model, trainer.attachment, ids, config)
    live = torch.stack([expected_live_count_reference(lb.detach().double())
                        for lb in trainer.attachment.log_betas])  # [L, B, T, H]
    M = config.budget

    def authors_hinge(s):  # max(0, (S_t - M) / (t - M)), mean over the positive entries
        t = torch.arange(s.shape[-2], dtype=s.dtype)[:, None]
        hinge = torch.relu((s - M) / (t - M).clamp(min=1))
        return hinge.sum() / (hinge > 0).sum()

    per_head = authors_hinge(live)
    # DBTrimKV: S summed over layers and heads against L*H*M, positions scaled by L*H
    L, H = live.shape[0], live.shape[3]
    total = live.sum(dim=(0, 3))[..., None]
    t = torch.arange(total.shape[-2], dtype=total.dtype)[:, None]
    hinge = torch.relu((total - L * H * M) / (t * L * H - L * H * M).clamp(min=1))
    shared = hinge.sum() / (hinge > 0).sum()
    expected = per_head if scope == "head" else shared
    assert out.cap == pytest.approx(float(expected), rel=1e-4)
    # heads differ (init_std): the two readings differ
    assert abs(float(per_head - shared)) > 1e-3


def test_distillation_starts_shared_projection_gates_from_per_layer_ones(tiny_model_dir, tmp_path):
    """Per-layer gates with varied scores, exported; a DBTrimKV run that distils from them
    starts with their scores: the log-rate error, measured here on fresh sequences, falls."""
    from sglang_evict.gates.checkpoint import save_gates
    from sglang_evict.training.distill import attention_inputs, distill_error

    model = tr.load_base_model(tiny_model_dir)
    source = RetentionGates(GateConfig.from_hf_config(model.config, gate_hidden=16, bias_init=4.0),
                            init_std=0.3, seed=5)
    path = save_gates(tmp_path / "per_layer.safetensors", source)
    config = _config(tiny_model_dir, tmp_path / "run", shared_projection=True,
                     distill_from=str(path), distill_steps=150, distill_tokens=600)
    fresh = tr.Trainer(_config(tiny_model_dir, tmp_path / "fresh", shared_projection=True))
    trainer = tr.Trainer(config)
    g = torch.Generator().manual_seed(11)
    probe = [torch.randint(0, model.config.vocab_size, (1, 96), generator=g) for _ in range(2)]
    inputs = attention_inputs(model, probe)
    assert trainer.gates.config.shared_projection
    assert distill_error(trainer.gates, source, inputs) < 0.3 * distill_error(fresh.gates, source,
                                                                               inputs)
    assert trainer.distilled["tokens"] >= 600
    assert trainer.run()["status"] == "completed"
    header = read_gate_header(Path(config.out_dir) / tr.EXPORT_FILE)
    assert header.training["distilled"]["from"] == str(path)
    with pytest.raises(tr.TrainConfigError, match="pick one"):
        _config(tiny_model_dir, tmp_path / "x", distill_from=str(path), init_gates=str(path))


def test_resume_gives_the_same_next_loss(tiny_model_dir, tmp_path):
    straight = tr.Trainer(_config(tiny_model_dir, tmp_path / "a"))
    straight.run()
    paused = tr.Trainer(_config(tiny_model_dir, tmp_path / "b"))
    assert paused.run(stop_at=2)["status"] == "paused"
    resumed = tr.Trainer(_config(tiny_model_dir, tmp_path / "b"), resume=True)
    assert (resumed.step, resumed.cursor) == (2, 2)
    resumed.run()
    for key in ("loss", "kl", "ce", "cap", "live", "lr", "tasks"):
        assert [r[key] for r in resumed.history] == [r[key] for r in straight.history], key
    for name, value in straight.gates.state_dict().items():
        assert torch.equal(value, resumed.gates.state_dict()[name]), name
    rows = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
    # A fresh run never overwrites a run's checkpoint.
    with pytest.raises(tr.TrainConfigError, match="--resume"):
        tr.Trainer(_config(tiny_model_dir, tmp_path / "b"))
    # A resume that would change the computation is refused.
    with pytest.raises(tr.TrainConfigError, match="lr"):
        tr.Trainer(_config(tiny_model_dir, tmp_path / "b", lr=0.1), resume=True)
    # A checkpoint from before a config field existed ran with that field's default.
    ckpt = tmp_path / "b" / tr.CHECKPOINT_FILE
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["answer_weight"]
    torch.save(state, ckpt)
    assert tr.Trainer(_config(tiny_model_dir, tmp_path / "b", steps=5), resume=True).step == 4
    with pytest.raises(tr.TrainConfigError, match="answer_weight: 1.0 -> 5.0"):
        tr.Trainer(_config(tiny_model_dir, tmp_path / "b", answer_weight=5.0), resume=True)


@pytest.mark.parametrize("shared", [False, True], ids=["trimkv", "dbtrimkv"])
def test_cli_run_exports_gates_that_load_for_serving(tiny_model_dir, tmp_path, shared, capsys):
    config_file = tmp_path / "train.toml"
    config_file.write_text(
        f'model = "{tiny_model_dir}"\nout_dir = "{tmp_path / "run"}"\n'
        f"lengths = [{LENGTH}]\ntasks = [\"essay\"]\nbudget = 8\ngate_hidden = 16\n"
        "bias_init = 3.0\nlr = 0.05\nwarmup_steps = 0\nprogress = false\n"
    )
    export = tmp_path / "export" / "gates.safetensors"
    code = tr.main([
        "--config", str(config_file), "--steps", "2", "--export", str(export),
        "--shared-projection", str(shared).lower(),
    ])
    assert code == 0, capsys.readouterr().err
    state = torch.load(tmp_path / "run" / tr.CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == 2 and state["cursor"] == 2
    assert {"optimizer", "scheduler", "rng", "history", "config"} <= set(state)
    trained = RetentionGates(GateConfig.from_dict(state["gate_config"]), init_std=0.0)
    trained.load_state_dict(state["gates"])

    hf_config = json.loads((tiny_model_dir / "config.json").read_text())
    for path in (tmp_path / "run" / tr.EXPORT_FILE, export):
        header = read_gate_header(path)
        assert header.config.budget == 8 and header.config.gate_hidden == 16
        assert header.config.shared_projection is shared
        assert header.training["steps"] == 2 and header.training["stopped"] == "completed"
        for loaded in (load_gates(path), load_gates_for_model(path, hf_config)):
            x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(2))
            for layer in range(2):
                assert torch.equal(loaded.forward_layer(layer, x), trained.forward_layer(layer, x))
    # Training moved the gates away from their initialisation.
    init = RetentionGates(trained.config, seed=0)
    assert any(
        not torch.equal(a, b) for a, b in zip(init.state_dict().values(), trained.state_dict().values())
    )
    keys = set(trained.state_dict())
    assert ("shared.w2.weight" in keys) is shared


def test_bad_inputs_fail_clearly(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(tr.TrainConfigError, match="budget"):
        _config(tiny_model_dir, tmp_path, budget=0)
    with pytest.raises(tr.TrainConfigError, match="unknown config field"):
        tr.load_config(None, {"budgett": 3})
    with pytest.raises(tr.TrainConfigError, match="does not exist"):
        tr.Trainer(_config(tmp_path / "missing", tmp_path / "run"))
    with pytest.raises(tr.TrainConfigError, match="tasks"):
        _config(tiny_model_dir, tmp_path, tasks=["nope"])
    with pytest.raises(tr.TrainConfigError, match="no checkpoint"):
        tr.Trainer(_config(tiny_model_dir, tmp_path / "empty"), resume=True)
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 0}')
    assert tr.main(["--config", str(bad)]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err
    assert tr.main(["--config", str(tmp_path / "none.toml")]) == 2
    assert tr.main(["--lr", "fast"]) == 2


def test_init_gates_starts_from_a_checkpoint(tiny_model_dir, tmp_path):
    first = tr.Trainer(_config(tiny_model_dir, tmp_path / "first", steps=2))
    first.run()
    exported = tmp_path / "first" / tr.EXPORT_FILE
    warm = tr.Trainer(_config(tiny_model_dir, tmp_path / "warm", init_gates=str(exported), seed=1))
    for name, value in first.gates.state_dict().items():
        assert torch.equal(warm.gates.state_dict()[name], value), name
    cold = tr.Trainer(_config(tiny_model_dir, tmp_path / "cold", seed=1))
    assert any(
        not torch.equal(a, b) for a, b in zip(cold.gates.state_dict().values(), warm.gates.state_dict().values())
    )
    warm.run(stop_at=1)
    assert read_gate_header(warm.export()[0]).training["init_gates"] == str(exported)
    # Gates of another width, or a file that is not a gate checkpoint, are refused by name.
    with pytest.raises(tr.TrainConfigError, match="gate_hidden"):
        tr.Trainer(_config(tiny_model_dir, tmp_path / "w", init_gates=str(exported), gate_hidden=8))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(tr.TrainConfigError, match="init_gates"):
        tr.Trainer(_config(tiny_model_dir, tmp_path / "j", init_gates=str(junk)))


def test_shipped_configs_describe_the_default_gates():
    """The committed configs load, their gate fields are the committed default gates', each
    later stage starts from the file the one before wrote, and the file's header is the last
    stage's run."""
    root = Path(__file__).resolve().parents[2]
    header = read_gate_header(tr.DEFAULT_GATES_DIR / "smollm2_135m_instruct_m128.safetensors")
    stages = [tr.load_config(root / "configs" / name) for name in (
        "train_smollm2_m128.toml", "train_smollm2_m128_stage2.toml", "train_smollm2_m128_stage3.toml",
    )]
    for before, after in zip(stages, stages[1:]):
        assert after.init_gates == after.export == before.export
    for config in stages:
        assert (config.budget, config.gate_hidden, config.variant, config.shared_projection) == (
            header.config.budget, header.config.gate_hidden, header.config.variant,
            header.config.shared_projection,
        )
    last = stages[-1]
    assert header.training["init_gates"] == last.init_gates
    assert (header.training["tasks"], header.training["lengths"], header.training["seed"]) == (
        last.tasks, last.lengths, last.seed,
    )
    assert header.training["answer_weight"] == last.answer_weight
    assert header.training["steps"] == last.steps and header.training["stopped"] == "completed"


def test_answer_tokens_weigh_answer_weight(tiny_model_dir, tmp_path):
    """The KL and CE means weigh the answer's tokens by answer_weight: the loss and the gates'
    gradients equal a direct computation from the full teacher and student logits."""
    config = _config(tiny_model_dir, tmp_path / "run", tasks=["niah_single_1"], answer_weight=7.0,
                     bias_init=1.0, capacity_weight=0.5)
    trainer = tr.Trainer(config)
    sample = trainer.data.sample(0)
    ids, start = sample["input_ids"], sample["answer_start"]
    tokenizer = trainer.data.tokenizer
    # answer_start splits the tokens into the prompt and the answer.
    assert 0 < start < len(ids)
    assert tokenizer.decode(ids[:start]) == sample["input"].rstrip(" ")
    assert tokenizer.decode(ids[start:]).strip().startswith(sample["outputs"][0])
    ids = torch.tensor([ids])

    got, got_grads, logp_t, logp_s = _loss_and_full_logits(trainer, ids, config, start)
    labels = ids[0, 1:]
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    ce = -logp_s.gather(1, labels[:, None])[:, 0]
    w = torch.ones_like(kl)
    w[start - 1:] = 7.0
    from sglang_evict.training.gated_attention import capacity_loss, expected_live_count

    cap = capacity_loss(torch.stack([expected_live_count(lb)
                                     for lb in trainer.attachment.log_betas]), config.budget)
    loss = ((kl + ce) * w).sum() / w.sum() + 0.5 * cap
    loss.backward()
    assert got.total == pytest.approx(float(loss.detach()), rel=1e-4)
    assert got.kl == pytest.approx(float(kl.mean()), rel=1e-4)  # logged unweighted
    assert got.kl_answer == pytest.approx(float(kl[start - 1:].mean()), rel=1e-4)
    for name, p in trainer.gates.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-3, atol=1e-7, msg=name)
    # The weight matters: at weight 1 the same sample gives another loss.
    trainer.optimizer.zero_grad(set_to_none=True)
    plain = tr.forward_backward(trainer.model, trainer.attachment, ids,
                                _config(tiny_model_dir, tmp_path / "p", bias_init=1.0,
                                        capacity_weight=0.5), answer_start=start)
    assert plain.total == pytest.approx(float(((kl + ce).mean() + 0.5 * cap).detach()), rel=1e-4)
    assert abs(plain.total - got.total) > 1e-3
    # Plain text has no answer.
    essay = tr.Trainer(_config(tiny_model_dir, tmp_path / "e", tasks=["essay"])).data.sample(0)
    assert essay["answer_start"] is None
    with pytest.raises(tr.TrainConfigError, match="answer_weight"):
        _config(tiny_model_dir, tmp_path / "x", answer_weight=0)


def test_answer_only_objective_is_the_authors(tiny_model_dir, tmp_path):
    """The default objective: (KL + CE) / 2 over the answer's tokens only, plus the capacity
    hinge; loss and gradients equal a direct computation from the full logits. The logits of
    the prompt's positions are never computed, and plain text (no answer) uses every token."""
    config = _config(tiny_model_dir, tmp_path / "run", tasks=["niah_single_1"], bias_init=1.0,
                     answer_only=True, kl_weight=0.5, ce_weight=0.5)
    trainer = tr.Trainer(config)
    sample = trainer.data.sample(0)
    start = sample["answer_start"]
    ids = torch.tensor([sample["input_ids"]])
    got, got_grads, logp_t, logp_s = _loss_and_full_logits(trainer, ids, config, start)
    labels = ids[0, 1:]
    answer = slice(start - 1, None)  # label j is token j + 1
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)[answer]
    ce = -logp_s.gather(1, labels[:, None])[:, 0][answer]
    from sglang_evict.training.gated_attention import capacity_loss, expected_live_count

    cap = capacity_loss(torch.stack([expected_live_count(lb)
                                     for lb in trainer.attachment.log_betas]), config.budget)
    loss = 0.5 * kl.mean() + 0.5 * ce.mean() + cap
    loss.backward()
    assert got.total == pytest.approx(float(loss.detach()), rel=1e-4)
    assert got.kl == pytest.approx(float(kl.mean()), rel=1e-4)
    for name, p in trainer.gates.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-3, atol=1e-7, msg=name)
    trainer.optimizer.zero_grad(set_to_none=True)
    # the prompt's positions carry no loss: their head is never run
    calls = []
    handle = trainer.model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[1]))
    tr.forward_backward(trainer.model, trainer.attachment, ids, config, answer_start=start)
    handle.remove()
    assert sum(calls) == 2 * (ids.shape[1] - start)  # teacher and student, answer rows only
    trainer.optimizer.zero_grad(set_to_none=True)
    essay = tr.forward_backward(trainer.model, trainer.attachment, ids, config, answer_start=None)
    full_kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()
    assert essay.kl == pytest.approx(float(full_kl), rel=1e-4)


def test_bf16_autocast_matches_float32(tiny_model_dir, tmp_path):
    """The frozen model under bf16 autocast gives the float32 loss and gradient direction within
    bf16's precision; the gates' log beta stays float32."""
    config = _config(tiny_model_dir, tmp_path / "run", tasks=["niah_single_1"], bias_init=1.0,
                     answer_only=True)
    trainer = tr.Trainer(config)
    sample = trainer.data.sample(2)
    ids = torch.tensor([sample["input_ids"]])
    runs = {}
    for precision in ("fp32", "autocast"):
        out = tr.forward_backward(trainer.model, trainer.attachment, ids, config,
                                  answer_start=sample["answer_start"], precision=precision)
        grad = torch.cat([p.grad.flatten() for p in trainer.gates.parameters()])
        assert all(lb.dtype == torch.float32 for lb in trainer.attachment.log_betas)
        runs[precision] = (out, grad)
        trainer.optimizer.zero_grad(set_to_none=True)
    (a, ga), (b, gb) = runs["fp32"], runs["autocast"]
    assert b.total == pytest.approx(a.total, rel=0.05)
    assert b.cap == pytest.approx(a.cap, rel=0.02)
    assert float(torch.nn.functional.cosine_similarity(ga, gb, dim=0)) > 0.95
    from sglang_evict.training.loss import cpu_has_bf16_matmul

    want = "autocast" if cpu_has_bf16_matmul() else "fp32"
    assert tr.resolve_precision("auto", torch.device("cpu")) == want


def test_shipped_dbtrimkv_config_describes_the_served_default_gates():
    """The default gates (DBTrimKV) were written by their committed config: same file, gate
    shape, data and hard-eviction settings in the file's header."""
    from sglang_evict import serve

    root = Path(__file__).resolve().parents[2]
    config = tr.load_config(root / "configs" / "train_smollm2_dbtrimkv_m128.toml")
    assert (root / config.export).resolve() == serve.DEFAULT_GATES.resolve()
    header = read_gate_header(serve.DEFAULT_GATES)
    assert (config.budget, config.gate_hidden, config.variant, config.shared_projection) == (
        header.config.budget, header.config.gate_hidden, header.config.variant, True,
    )
    assert (header.training["tasks"], header.training["lengths"], header.training["seed"]) == (
        config.tasks, config.lengths, config.seed,
    )
    assert header.training["method"] == "DBTrimKV (shared projection)"
    assert config.hard_eviction and config.eviction_policy == "retention-global"
    assert (f"hard eviction ({config.eviction_policy}, M={config.budget}, "
            f"B={config.eviction_buffer}, sinks={config.eviction_sinks}") in header.training["loss"]
    assert header.training["distilled"]["from"] == config.distill_from


def test_the_committed_v2_run_resumes_with_its_config():
    """train_runs/dbtrimkv_v2 holds a run's whole state; `--resume` with the committed config
    is accepted (no field that changes what a step computes differs) and continues from the
    saved step, with the authors' objective and the additive form's DBTrimKV settings."""
    root = Path(__file__).resolve().parents[2]
    config = tr.load_config(root / "configs" / "train_smollm2_dbtrimkv_v2.toml")
    state = torch.load(root / config.out_dir / tr.CHECKPOINT_FILE, map_location="cpu",
                       weights_only=False)
    saved, now = state["config"], config.to_dict()
    changed = [k for k in now if k not in tr.config.RESUMABLE_CHANGES and saved.get(k) != now[k]]
    assert changed == []
    assert state["step"] >= 1 and state["step"] == len(state["history"]) <= config.steps
    assert config.answer_only and not config.hard_eviction and config.capacity_scope == "global"
    assert (config.kl_weight, config.ce_weight, config.capacity_weight) == (0.5, 0.5, 1.0)
    assert {"optimizer", "scheduler", "rng", "gates", "cursor"} <= set(state)


def test_sigterm_stops_a_cli_run_at_a_step_boundary_with_nothing_lost(tiny_model_dir, tmp_path):
    """`kill PID` on a running `sglang-evict train` (as a scheduler or a session's end sends
    it): the step under way finishes, the whole state is saved, and every logged step is in the
    checkpoint, so `--resume` goes on from there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config_file = tmp_path / "train.toml"
    run = tmp_path / "run"
    config_file.write_text(
        f'model = "{tiny_model_dir}"\nout_dir = "{run}"\n'
        f"lengths = [{LENGTH}]\ntasks = [\"essay\"]\nbudget = 8\ngate_hidden = 16\n"
        "bias_init = 3.0\nlr = 0.05\nwarmup_steps = 0\nprogress = false\ncheckpoint_every = 1000\n"
        "loss_chunk = 64\nattn_chunk = 64\ndtype = \"fp32\"\n"
    )
    cmd = [sys.executable, "-m", "sglang_evict.cli", "train", "--config", str(config_file),
           "--steps", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 300
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and proc.poll() is None:
        assert time.monotonic() < deadline, "no training steps logged"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert '"status": "interrupted"' in out
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    state = torch.load(run / tr.CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == logged[-1] >= 3 and logged == list(range(1, logged[-1] + 1))
    resumed = tr.Trainer(tr.load_config(config_file, {"steps": state["step"] + 1}), resume=True)
    assert resumed.step == state["step"]

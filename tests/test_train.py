"""The SKD trainer: smoke run, exact resume, cross-device restore, NaN stop, corrupt checkpoints,
export parity against transformers (issue 5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import sense_jax
from sense_jax.errors import SenseJaxError
from skd_helpers import make_sense_dict, make_skd_inputs, make_teacher, permute_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sense_jax import trainer as T  # noqa: E402

# The trainer is rebuilt by every run below; identical step programs (a run and its resume) are
# compiled once thanks to the persistent compilation cache, which trainer.train turns on in the
# suite's temporary directory (tests/conftest.py).


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm_dir, sentences):
    """Tiny teacher dir, its sense dictionary on disk (with the teacher's fingerprint), the corpus."""
    return make_skd_inputs(tmp_path_factory.mktemp("skd"), minilm_dir, sentences)


def _cfg(assets, out, **kw):
    base = dict(teacher=str(assets["teacher_dir"]), senses=str(assets["senses"]),
                train_data=str(assets["corpus"]), out_dir=str(out), progress=False, steps=6,
                batch_size=8, grad_accum=2, max_length=16, student_layers=1, warmup_steps=2, learning_rate=3e-3,
                save_every=3, keep_checkpoints=3, eval_every=3, eval_batches=1, eval_fraction=0.1)
    base.update(kw)
    return T.load_config(None, [f"{k}={v}" for k, v in base.items()])


def _flat(params) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    """2M = 6 steps in one run (grad_accum 2, evaluation and checkpoints every 3 steps)."""
    out = tmp_path_factory.mktemp("full") / "run"
    return T.train(_cfg(assets, out))


def test_trainer_smoke_run(full_run, assets):
    r = full_run
    # One trace per length bucket that fits max_length=16 (8 and 16), never one per step.
    assert int(r.state.step) == 6 and 1 <= r.setup.raw_step.traces <= 2
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x["kind"] == "train"]
    evals = [x for x in recs if x["kind"] == "eval"]
    assert [x["step"] for x in train] == list(range(1, 7)) and [x["step"] for x in evals] == [3, 6]
    assert all(np.isfinite(x["loss"]) and 0 <= x["accuracy"] <= 1 and x["tokens"] > 0 for x in train)
    assert train[0]["lr"] == 0.0 and train[2]["lr"] == pytest.approx(3e-3)  # warmup, then cosine
    assert (r.run_dir / "curves.png").stat().st_size > 1000
    assert sorted(os.listdir(r.run_dir / "checkpoints")) == ["3", "6"]
    # Only the student and adaptor train; the teacher's pooler (frozen) and the teacher do not.
    teacher = assets["teacher"]
    p = jax.device_get(r.state.params)
    tp = jax.device_get(teacher.params)
    np.testing.assert_array_equal(p["pooler"]["kernel"], tp["pooler"]["kernel"])
    assert not np.array_equal(p["student"]["layer_0"]["intermediate"]["kernel"],
                              tp["layer_0"]["intermediate"]["kernel"])
    assert not np.array_equal(p["adaptor"]["dense"]["kernel"], np.eye(32, dtype=np.float32))
    np.testing.assert_array_equal(jax.device_get(r.setup.frozen[0])["layer_0"]["intermediate"]["kernel"],
                                  tp["layer_0"]["intermediate"]["kernel"])
    assert set(p) == {"student", "adaptor", "pooler"}  # the teacher's encoder is never in the state
    assert sorted(p["student"]) == ["embeddings", "layer_0"]


def test_resume_after_kill_gives_identical_params(full_run, assets, tmp_path):
    out = tmp_path / "run"
    first = T.train(_cfg(assets, out), stop_after=3)  # "killed" after step 3 (saved at 3)
    assert int(first.state.step) == 3
    resumed = T.train(_cfg(assets, out))
    assert resumed.resumed_from == 3 and int(resumed.state.step) == 6
    _assert_same(_flat(resumed.state.params), _flat(full_run.state.params))
    for a, b in zip(jax.tree.leaves(resumed.state.opt_state), jax.tree.leaves(full_run.state.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 7))

    # A corrupt newest checkpoint and a leftover partial save: the previous complete one is used.
    victim = max((out / "checkpoints" / "6" / "state").rglob("*"), key=lambda f: f.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 3)
    (out / "checkpoints" / "9.orbax-checkpoint-tmp-1" / "state").mkdir(parents=True)
    logs = []
    again = T.train(_cfg(assets, out), log=logs.append)
    assert again.resumed_from == 3 and any("checkpoints/6 cannot be restored" in m for m in logs)
    _assert_same(_flat(again.state.params), _flat(full_run.state.params))
    names = sorted(os.listdir(out / "checkpoints"))
    assert names[:2] == ["3", "6"] and names[2].startswith("6.unreadable-")  # step 6 saved anew

    # A config that changes the run's structure is refused, naming the key.
    with pytest.raises(sense_jax.ConfigError, match="student_layers=1, now student_layers=2"):
        T.train(_cfg(assets, out, student_layers=2))


def test_export_matches_transformers_and_bad_checkpoints_are_refused(full_run, assets, tmp_path, capsys):
    import torch
    from transformers import AutoModel

    from sense_jax.cli import main

    assert main(["export", str(full_run.run_dir), str(tmp_path / "hf")]) == 0
    model = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    s = full_run.setup
    b = dict(assets["teacher"].tokenizer(["The bank by the river bank.", "A bat flew."], padding=True,
                                         return_tensors="np"))
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in b.items()})
    params = jax.device_get(full_run.state.params)
    ours = np.asarray(s.student_module.apply({"params": params["student"]}, b["input_ids"],
                                             b["attention_mask"], b["token_type_ids"]))
    real = b["attention_mask"].astype(bool)
    assert np.abs(ours - ref.last_hidden_state.numpy())[real].max() < 1e-4
    pk, pb = params["pooler"]["kernel"], params["pooler"]["bias"]  # the teacher's frozen pooler
    np.testing.assert_allclose(ref.pooler_output.numpy(), np.tanh(ours[:, 0] @ pk + pb), atol=1e-5)
    # Bad checkpoint directories: refused with one line, exit 2.
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["export", str(empty), str(tmp_path / "x")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    hf_dir = tmp_path / "hf_model"  # a transformers directory (not converted) is named as such
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    assert main(["export", str(hf_dir), str(tmp_path / "z")]) == 2
    assert "is a transformers model directory, not a training run" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    broken = tmp_path / "broken"
    shutil.copytree(full_run.run_dir, broken)
    for step in ("3", "6"):
        shutil.rmtree(broken / "checkpoints" / step / "state")
    with pytest.raises(SenseJaxError, match="no checkpoint could be restored"):
        T.export_checkpoint(broken, tmp_path / "y", log=lambda m: None)


def test_trainer_refuses_another_vocabulary_or_dictionary(assets, minilm_dir, sentences, tmp_path):
    other = make_teacher(tmp_path / "other", minilm_dir, vocab_size=30000)
    with pytest.raises(sense_jax.ConfigError, match=r"student .*other has vocab_size 30000 but teacher"):
        T.train(_cfg(assets, tmp_path / "a", student=str(other)))
    wide = make_sense_dict(assets["teacher"].tokenizer, sentences, hidden_size=48)
    wide.save(tmp_path / "wide")
    with pytest.raises(SenseJaxError, match=r"wide: senses have width 48 but the teacher's hidden_size is 32"):
        T.train(_cfg(assets, tmp_path / "b", senses=str(tmp_path / "wide")))
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_cli_distill_from_a_config_file_with_overrides(full_run, assets, tmp_path, capsys):
    import dataclasses

    from sense_jax.cli import main

    cfg = dataclasses.asdict(full_run.setup.cfg)
    cfg.update(out_dir="ignored", progress=True)
    (tmp_path / "run.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()))
    out = tmp_path / "cli-run"
    assert main(["distill", "--config", str(tmp_path / "run.yaml"), "--set", f"out_dir={out}"]) == 0
    captured = capsys.readouterr()
    assert "trained to step 6" in captured.out and "held-out sense accuracy" in captured.out
    assert "distill: 100%" in captured.err  # the tqdm bar
    ref = [json.loads(x) for x in (full_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    key = lambda recs: [(r["kind"], r["step"], r.get("loss"), r["accuracy"]) for r in recs]
    assert key(got) == key(ref)  # same config, same run, same numbers


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(assets, out, learning_rate=1e30, warmup_steps=0, clip_norm=0, save_every=1, steps=5,
               grad_accum=1, eval_every=0)
    with pytest.raises(T.TrainingDiverged, match=r"at step (\d); .*last good checkpoint is step") as e:
        T.train(cfg)
    bad = int(__import__("re").search(r"at step (\d)", str(e.value)).group(1))
    assert bad >= 2
    assert sorted(int(x) for x in os.listdir(out / "checkpoints")) == list(range(1, bad))


_CROSS = textwrap.dedent("""
    import json, sys, numpy as np, jax
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    from sense_jax import trainer as T
    from test_train import _flat
    cfg_json, dump = sys.argv[2], sys.argv[3]
    cfg = T.DistillConfig(**json.loads(cfg_json))
    assert jax.device_count() == 8
    # 1. Train one step, save, dump the params.
    r = T.train(cfg, stop_after=1)
    np.savez(dump, **_flat(r.state.params))
    spec = r.state.params["student"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec
    print("SPEC", spec)
    print("SAVED", flush=True)
    # 2. Once the test has trained on elsewhere (it writes the params' path to stdin): restore the
    # newest checkpoint onto this 8-device layout, equal to those params.
    dump = sys.stdin.readline().strip()
    s = T.setup(cfg)
    mngr = T.checkpoint_manager(cfg.out_dir + "/checkpoints", save_every=1, keep=3)
    state, data, step = T.restore_latest(mngr, s.layout.abstract_state)
    ref = np.load(dump, allow_pickle=False)
    got = _flat(state.params)
    assert sorted(ref.files) == sorted(got), "keys"
    for k in got:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    print("RESTORED", step, data["micro_batches"])
""")


def _start8(cfg, dump: Path, stderr) -> subprocess.Popen:
    """The _CROSS process on 8 simulated devices: one process for both directions (one start and
    one import of the libraries fewer than a process per direction)."""
    import dataclasses

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", _CROSS, str(ROOT), json.dumps(dataclasses.asdict(cfg)), str(dump)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_checkpoint_moves_between_8_devices_and_1(assets, tmp_path):
    out = tmp_path / "run"
    # The full run's program, FSDP-sharded over 8 devices; saved after step 1.
    cfg8 = _cfg(assets, out, fsdp=True, save_every=1, eval_every=0)
    with open(tmp_path / "stderr8.txt", "w+") as err:
        p = _start8(cfg8, tmp_path / "eight.npz", err)
        try:
            stdout = ""
            while "SAVED" not in stdout:
                line = p.stdout.readline()
                if not line:  # the process ended before saving
                    p.wait(timeout=60)
                    err.seek(0)
                    raise AssertionError(f"8-device process exited {p.returncode}: {err.read()[-3000:]}")
                stdout += line
            assert "('model', 'data')" in stdout  # the word embeddings really were sharded
            # 8 -> 1: restore on this process's single device, equal to what the 8-device run held.
            cfg1 = dataclasses_replace(cfg8, fsdp=False)
            r = T.train(cfg1, stop_after=1)
            assert r.resumed_from == 1 and jax.device_count() == 1
            _assert_same(_flat(r.state.params), dict(np.load(tmp_path / "eight.npz", allow_pickle=False)))
            # Train on to step 6 on 1 device; 1 -> 8: restore onto the 8-device FSDP layout.
            r = T.train(dataclasses_replace(cfg1, save_every=3))
            assert int(r.state.step) == 6
            np.savez(tmp_path / "one.npz", **_flat(r.state.params))
            rest, _ = p.communicate(str(tmp_path / "one.npz") + "\n", timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        err.seek(0)
        assert p.returncode == 0, err.read()[-3000:]
    assert "RESTORED 6 12" in rest


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_every_passage_is_seen_each_epoch_with_a_wrapped_last_batch(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    passages = [f"passage number {i}" for i in range(10)]
    for window in (0, 2):
        stream = T.PassageStream(passages, tok, batch_size=4, max_length=16, seed=3, group_window=window)
        assert stream.per_epoch == 3
        for epoch in range(2):
            seen = np.concatenate([stream.indices(3 * epoch + r) for r in range(3)])
            assert len(seen) == 12 and set(seen.tolist()) == set(range(10))


def test_length_grouping_keeps_every_passage_once_per_epoch_and_cuts_padding(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    rng = np.random.default_rng(0)
    passages = [" ".join(["word"] * int(n)) for n in rng.integers(1, 40, 64)]  # lengths 3..41 tokens
    grouped = T.PassageStream(passages, tok, batch_size=4, max_length=48, seed=1, group_window=4)
    plain = T.PassageStream(passages, tok, batch_size=4, max_length=48, seed=1)
    epoch = [grouped.indices(j) for j in range(16)]  # 16 micro-batches of 4 = one epoch, 4 windows
    assert sorted(np.concatenate(epoch).tolist()) == list(range(64))
    for w in range(4):  # each window holds the same passages as without grouping
        assert sorted(np.concatenate(epoch[4 * w:4 * w + 4]).tolist()) == \
            sorted(np.concatenate([plain.indices(j) for j in range(4 * w, 4 * w + 4)]).tolist())

    def padded(stream):
        return sum(b[0]["attention_mask"].size for b in (stream.step_batches(j, 1, True) for j in range(16)))

    assert padded(grouped) < 0.8 * padded(plain)
    again = T.PassageStream(passages, tok, batch_size=4, max_length=48, seed=1, group_window=4)
    assert [again.indices(j).tolist() for j in (13, 2, 7)] == [epoch[j].tolist() for j in (13, 2, 7)]


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(assets, tmp_path):
    # Two passages of 12 and 2 real tokens: one step of 2 micro-batches of 1 passage must equal
    # one step of 1 batch of 2 (the token mean over the whole step), for SKD, accuracy and MSE.
    s = T.setup(_cfg(assets, tmp_path / "run", batch_size=2, grad_accum=1, mse_weight=0.5))
    passages = ["The bank by the river bank flooded in spring.", ""]
    b = T.tokenize(s.teacher.tokenizer, passages, 16)
    assert b["attention_mask"].sum(1).tolist() == [12, 2]
    state = T.init_state(s)
    step = jax.jit(s.raw_step)
    one, m1 = step(state, {k: v[None] for k, v in b.items()}, s.frozen)         # [1, 2, T]
    two, m2 = step(state, {k: v[:, None] for k, v in b.items()}, s.frozen)      # [2, 1, T]
    m1, m2 = jax.device_get(m1), jax.device_get(m2)
    assert float(m1["tokens"]) > 0 and float(m1["mse"]) > 0
    for k in ("loss", "skd", "mse", "accuracy", "tokens", "grad_norm"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=2e-5, err_msg=k)
    a, c = _flat(one.params), _flat(two.params)
    for k in a:
        np.testing.assert_allclose(c[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)


def _senses_of(teacher_dir: Path, sentences, out: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A dictionary recording ``teacher_dir``'s fingerprint (as if built from it), saved to ``out``."""
    from sense_jax.fingerprints import teacher_fingerprint

    t = sense_jax.load_model(teacher_dir)
    fp = teacher_fingerprint(t.params, 30522, t.tokenizer)
    make_sense_dict(t.tokenizer, sentences, hidden_size=hidden_size, seed=seed,
                    meta={"teacher_fingerprint": fp}).save(out)
    return out


def test_a_refused_resume_keeps_every_checkpoint_and_the_next_run_resumes(assets, minilm_dir, sentences,
                                                                          tmp_path, capsys):
    from sense_jax.cli import main

    out = tmp_path / "run"
    kw = dict(steps=6, save_every=2, eval_every=0, grad_accum=1)
    T.train(_cfg(assets, out, **kw), stop_after=4)  # "killed" after step 4: steps 2 and 4 saved
    ckpts = out / "checkpoints"
    before = {p.relative_to(ckpts): p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    config_json = (out / "config.json").read_bytes()

    def refused(match: str, **changes):
        cfg = _cfg(assets, out, **kw, **changes)
        args = ["distill", *[x for k, v in dataclasses_asdict(cfg).items() for x in ("--set", f"{k}={v}")]]
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0] and match in err[0], err
        # nothing set aside, renamed or rewritten: not a checkpoint, not the run's files
        assert {p.relative_to(ckpts): p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before
        assert (out / "config.json").read_bytes() == config_json
        return err[0]

    # The user's mistake: a wider teacher (and its dictionary) where teacher A was.
    wide = make_teacher(tmp_path / "wide", minilm_dir, hidden_size=48)
    line = refused("the checkpoint was trained with teacher hidden_size=32, now teacher hidden_size=48",
                   teacher=wide, senses=_senses_of(wide, sentences, tmp_path / "wide-senses", hidden_size=48))
    assert str(ckpts / "4") in line
    # A teacher of the same shapes swapped in, with a dictionary rebuilt from it.
    other = make_teacher(tmp_path / "other", minilm_dir, seed=1)
    refused("teacher fingerprint=v2-", teacher=other, senses=_senses_of(other, sentences, tmp_path / "o-senses"))
    # The same weights behind a permuted tokenizer, with a dictionary recording it.
    perm = permute_tokenizer(assets["teacher_dir"], tmp_path / "perm")
    refused("the teacher's tokenizer fingerprint=", teacher=perm,
            senses=_senses_of(perm, sentences, tmp_path / "p-senses"))
    # The same teacher, another dictionary: other senses; the same senses, other centres.
    refused("sense dictionary senses=", senses=_senses_of(assets["teacher_dir"], sentences,
                                                          tmp_path / "s-senses", seed=1))
    sd = sense_jax.SenseDictionary.load(assets["senses"])
    sense_jax.SenseDictionary.from_arrays(np.asarray(sd.centres) + 1, sd.offsets, sd.counts, sd.meta).save(
        tmp_path / "shifted")
    refused("sense dictionary fingerprint=", senses=tmp_path / "shifted")
    # The fixed command resumes from step 4; a moved teacher directory is the same teacher.
    import shutil

    moved = shutil.copytree(assets["teacher_dir"], tmp_path / "moved")
    r = T.train(_cfg(assets, out, **kw, teacher=moved), stop_after=5)
    assert r.resumed_from == 4 and int(r.state.step) == 5
    assert sorted(os.listdir(ckpts)) == ["2", "4"]


def dataclasses_asdict(cfg):
    import dataclasses

    return dataclasses.asdict(cfg)


def test_checkpoints_and_exports_record_their_provenance(full_run, tmp_path):
    import shutil

    from sense_jax.provenance import provenance

    run = shutil.copytree(full_run.run_dir, tmp_path / "run")
    meta_file = run / "checkpoints" / "6" / "meta" / "metadata"  # Orbax JsonSave's file
    meta = json.loads(meta_file.read_text())
    assert meta["provenance"] == provenance() and meta["tokenizer_fingerprint"] and meta["dictionary_fingerprint"]
    # Written under another major jax version: restoring it warns, naming both versions.
    meta["provenance"]["versions"]["jax"] = "0.1.0"
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=f"was written with jax 0.1.0, this process has jax {jax.__version__}"):
        T.export_checkpoint(run, tmp_path / "hf", log=lambda m: None)
    exported = json.loads((tmp_path / "hf" / "adaptor.json").read_text())
    assert exported["provenance"] == provenance() and exported["trained_with"]["versions"]["jax"] == "0.1.0"


_SPY = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [sys.argv[1]]
    from sense_jax.training import data as T  # where the trainer tokenises (training and held-out)
    real = T.tokenize

    from sense_jax.cli import main
    # Several runs one after another in this process (argv[2]: JSON [[log, argv], ...]); the first's
    # --distributed flags initialise jax.distributed, which the later runs share.
    for log_path, argv in json.loads(sys.argv[2]):
        log = open(log_path, "w")

        def spy(tok, texts, max_length, batch_size=None, log=log):  # what this process tokenises
            log.write(json.dumps(list(texts)) + "\\n"); log.flush()
            return real(tok, texts, max_length, batch_size)

        T.tokenize = spy
        if main(argv) != 0:
            sys.exit(1)
        log.close()
""")

PACKS = (0, 32)


def _two_process_kw(pack: int) -> dict:
    return dict(steps=2, batch_size=4, grad_accum=2, save_every=2, eval_every=0, eval_fraction=0.1,
                plot=False, pack_length=pack, teacher_cache="off")


@pytest.fixture(scope="module")
def two_process_runs(assets, tmp_path_factory):
    """For each pack length in PACKS: one run by two processes of one device each (over
    jax.distributed) and one run of the same config by one process of two devices. The 3 processes
    are started once and run both pack lengths one after the other (half the process starts and
    jax.distributed handshakes). Returns the root; its pack{P}/ holds two/, one/ and the
    tokenisation logs texts0.jsonl, texts1.jsonl, texts-one.jsonl."""
    import dataclasses
    import socket

    root = tmp_path_factory.mktemp("two-processes")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def runs(out: str, log: str, *flags: str) -> list:
        plan = []
        for i, pack in enumerate(PACKS):
            (root / f"pack{pack}").mkdir(exist_ok=True)
            cfg = _cfg(assets, root / f"pack{pack}" / out, **_two_process_kw(pack))
            sets = [x for k, v in dataclasses.asdict(cfg).items() for x in ("--set", f"{k}={v}")]
            plan.append([str(root / f"pack{pack}" / log), ["distill", *(flags if i == 0 else ()), *sets]])
        return plan

    def spawn(devices: int, plan: list) -> subprocess.Popen:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        return subprocess.Popen([sys.executable, "-c", _SPY, str(ROOT), json.dumps(plan)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Two processes of one device each, and the same global batches on one process of two devices.
    procs = [spawn(1, runs("two", f"texts{i}.jsonl", "--distributed", "--coordinator", f"127.0.0.1:{port}",
                           "--num-processes", "2", "--process-id", str(i))) for i in range(2)]
    procs.append(spawn(2, runs("one", "texts-one.jsonl")))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    for o in (outs[0], outs[2]):
        assert o.count("trained to step 2") == len(PACKS), o[-2000:]
    return root


@pytest.mark.parametrize("pack", PACKS)
def test_two_processes_train_like_one_and_their_checkpoint_resumes_on_one(assets, two_process_runs, tmp_path, pack):
    # pack 32: 4 rows of 32 tokens per micro-batch, each process tokenising its 2 rows' passages.
    # (No teacher cache: its build would tokenise too; packed, 2 steps see the passages twice.)
    kw = _two_process_kw(pack)
    runs = two_process_runs / f"pack{pack}"
    # Each process tokenised only its half of every batch (4 training micro-batches, 1 held-out).
    seen = [[json.loads(x) for x in (runs / f"texts{i}.jsonl").read_text().splitlines()]
            for i in ("0", "1", "-one")]
    assert [a + b for a, b in zip(seen[0], seen[1])] == seen[2] and len(seen[2]) == 5
    if pack:  # several passages per row; each process its rows' passages
        assert all(len(b) > 4 for b in seen[2][:4]) and all(len(b) > 0 for b in seen[0][:4] + seen[1][:4])
    else:
        assert all(len(b) == 4 for b in seen[2]) and all(len(b) == 2 for b in seen[0])
    held_out = [[r for r in map(json.loads, (runs / out / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "eval"] for out in ("two", "one")]
    assert held_out[0] == held_out[1] and len(held_out[0]) == 1
    # Both checkpoints restore here, on one device, to the same params.
    s = T.setup(_cfg(assets, tmp_path / "x", **kw))
    restored = {}
    for out in ("two", "one"):
        mngr = T.checkpoint_manager(runs / out / "checkpoints", save_every=2, keep=3)
        try:
            state, data, step = T.restore_latest(mngr, s.layout.abstract_state)
        finally:
            mngr.close()
        assert step == 2 and data["micro_batches"] == 4
        restored[out] = _flat(state.params)
    _assert_same(restored["two"], restored["one"])
    if not pack:  # (the same restore path packed or not: run once)
        # The checkpoint of 2 processes resumes on 1.
        r = T.train(_cfg(assets, runs / "two", **dict(kw, steps=3)))
        assert r.resumed_from == 2 and int(r.state.step) == 3


def test_checkpoints_from_before_the_fingerprints_still_resume(full_run, tmp_path):
    # A checkpoint meta as written before the tokenizer / dictionary fingerprints: a version-1
    # (embedding-only) teacher fingerprint, no provenance.
    current = full_run.setup.meta
    old = {k: v for k, v in json.loads(json.dumps(current)).items()
           if k not in ("tokenizer_fingerprint", "dictionary_fingerprint", "dictionary_shape", "provenance",
                        "embedding_fingerprint")}
    old["teacher_fingerprint"] = current["embedding_fingerprint"]
    T._check_resume(old, current, "ckpt")
    # Without fingerprints of the dictionary and tokenizer, their paths still have to match.
    moved = json.loads(json.dumps(current))
    moved["config"]["senses"] = "elsewhere"
    with pytest.raises(sense_jax.ConfigError, match="ckpt: the checkpoint was trained with senses="):
        T._check_resume(old, moved, "ckpt")
    T._check_resume(current, moved, "ckpt")  # with them, a moved dictionary is the same dictionary
    with pytest.raises(sense_jax.ConfigError, match="teacher fingerprint=0123456789abcdef, now teacher "
                                                    "fingerprint=" + current["embedding_fingerprint"]):
        T._check_resume(dict(old, teacher_fingerprint="0123456789abcdef"), current, "ckpt")


def test_freeze_embeddings_keeps_them_and_drops_their_optimizer_state(assets, full_run, tmp_path):
    """``freeze_embeddings=true``: the truncated student's input embeddings stay the teacher's
    bit for bit, everything else trains, and AdamW keeps no moments for them (issue 18)."""
    import optax

    r = T.train(_cfg(assets, tmp_path / "frozen", steps=2, freeze_embeddings=True, eval_every=0,
                     plot=False))
    p = jax.device_get(r.state.params)
    tp = jax.device_get(assets["teacher"].params)
    for name, table in _flat(tp["embeddings"]).items():
        np.testing.assert_array_equal(_flat(p["student"]["embeddings"])[name], table, err_msg=name)
    assert not np.array_equal(p["student"]["layer_0"]["intermediate"]["kernel"],
                              tp["layer_0"]["intermediate"]["kernel"])

    def moment_sizes(state):
        mus = [s.mu for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(mus))

    vocab_table = int(np.prod(tp["embeddings"]["word_embeddings"]["embedding"].shape))
    assert moment_sizes(full_run.state) - moment_sizes(r.state) >= vocab_table
    # The default run trains its embeddings.
    assert not np.array_equal(jax.device_get(full_run.state.params)["student"]["embeddings"]
                              ["word_embeddings"]["embedding"], tp["embeddings"]["word_embeddings"]["embedding"])
    # Switching the option on a resume would change the optimizer state: refused by name.
    with pytest.raises(SenseJaxError, match="freeze_embeddings=True, now freeze_embeddings=False"):
        T.train(_cfg(assets, tmp_path / "frozen", steps=4, eval_every=0, plot=False))


# --- Packed rows (pack_length, issue 15 item 2) ------------------------------------------------


@pytest.mark.parametrize("objective", ["skd", "mse"])
def test_a_packed_batch_gives_the_unpacked_loss_and_gradient(assets, tmp_path, objective):
    # The same 9 passages (4..16 tokens) once padded one per row [9, 16] and once packed into rows
    # of 32 with segment ids: the step's loss, metrics and gradient agree (each passage attends
    # only to itself and its positions restart, and every mean counts the same real tokens).
    # SKD with an MSE term beside it; the MSE baseline without a dictionary.
    from sense_jax.batching import pack_passages
    from sense_jax.training.data import packed_rows

    w = dict(mse_weight=0.5) if objective == "skd" else dict(skd_weight=0, mse_weight=1, senses="")
    s = T.setup(_cfg(assets, tmp_path / "run", batch_size=1, grad_accum=1, pack_length=32, **w))
    passages = assets["sentences"][:9]
    plain = T.tokenize(s.teacher.tokenizer, passages, 16)
    lengths = plain["attention_mask"].sum(1)
    pk = pack_passages(lengths, 32)
    assert pk.n_rows < len(passages) and lengths.min() < 16 == lengths.max()
    packed = packed_rows(s.teacher.tokenizer, passages, pk.row, pk.offset, pk.n_rows, 32, 16)
    np.testing.assert_array_equal(packed["segment_ids"], pk.segment_ids)
    assert packed["attention_mask"].sum() == lengths.sum()
    state = T.init_state(s)
    step = s.raw_step
    key = jax.random.PRNGKey(0)

    def loss_and_grad(batch):
        den = step.denominators_fn({k: v[None] for k, v in batch.items()}, s.frozen)
        (loss, m), g = jax.jit(jax.value_and_grad(step.loss_fn, has_aux=True))(
            state.params, batch, s.frozen, key, den)
        return jax.device_get(m), _flat(g)

    (mu, gu), (mp, gp) = loss_and_grad(plain), loss_and_grad(packed)
    assert set(mu) == set(mp) and float(mu["loss"]) > 0
    for k in mu:
        np.testing.assert_allclose(float(mp[k]), float(mu[k]), rtol=1e-5, err_msg=k)
    # Within 1e-5 of the largest gradient entry (some are zero but for rounding: a key bias
    # cannot move a softmax).
    scale = max(float(np.abs(g).max()) for g in gu.values())
    assert scale > 1e-3
    for k in gu:
        np.testing.assert_allclose(gp[k], gu[k], rtol=0, atol=1e-5 * scale, err_msg=k)


def test_the_packed_stream_holds_every_passage_once_per_epoch_and_restarts_anywhere(minilm_dir):
    from transformers import AutoTokenizer

    from sense_jax.training.data import tokenize

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    rng = np.random.default_rng(0)
    passages = [" ".join(["word"] * int(n)) for n in rng.integers(1, 30, 50)]  # 3..16 tokens (max_length 16)
    stream = T.PackedStream(passages, tok, batch_size=3, max_length=16, pack_length=40, seed=5)
    lengths = stream.lengths()
    assert lengths.max() == 16 and lengths.min() == 3
    R, M = stream.rows_per_epoch, stream.per_epoch
    assert int(lengths.sum()) / 40 <= R < len(passages) and M == -(-R // 3)
    epochs = []
    for epoch in range(2):
        batches = [stream.micro_batch(epoch * M + r) for r in range(M)]
        seen = np.concatenate([stream.indices(epoch * M + r) for r in range(M)])
        # every passage once, and the last micro-batch's fill: the epoch's first rows again
        fill = M * 3 - R
        first = stream.layout(epoch * M, slice(0, fill))[0]
        assert sorted(seen.tolist()) == sorted(list(range(len(passages))) + first.tolist())
        for r, b in enumerate(batches):
            assert all(v.shape == (3, 40) for v in b.values())
            np.testing.assert_array_equal(b["attention_mask"], b["segment_ids"] > 0)
            idx, row, offset = stream.layout(epoch * M + r)
            # each passage's tokens, at its offset in its row, are its own tokenisation
            alone = tokenize(tok, [passages[i] for i in idx], 16)
            for i in range(len(idx)):
                n = lengths[idx[i]]
                assert offset[i] + n <= 40
                np.testing.assert_array_equal(b["input_ids"][row[i], offset[i]:offset[i] + n],
                                              alone["input_ids"][i, :n])
                assert len(set(b["segment_ids"][row[i], offset[i]:offset[i] + n].tolist())) == 1
        epochs.append([b["input_ids"] for b in batches])
    assert any(not np.array_equal(a, b) for a, b in zip(*epochs))  # another order each epoch
    # A new stream (a restarted process) gives micro-batch j without visiting the ones before.
    again = T.PackedStream(passages, tok, batch_size=3, max_length=16, pack_length=40, seed=5)
    for j in (M + 2, 1, 2 * M + 1, 0):
        for k, v in again.micro_batch(j).items():
            np.testing.assert_array_equal(v, stream.micro_batch(j)[k])
    other = T.PackedStream(passages, tok, batch_size=3, max_length=16, pack_length=40, seed=6)
    assert not np.array_equal(other.indices(0), stream.indices(0))
    # Packing cuts the padding of the same epoch padded one passage per row to max_length.
    assert stream.padding_fraction < 0.5 * (1 - lengths.sum() / (16 * len(passages)))
    # A process's rows are its part of the micro-batch, and it tokenises only their passages.
    parts = [stream.micro_batch(4, slice(0, 1)), stream.micro_batch(4, slice(1, 3))]
    for k, v in stream.micro_batch(4).items():
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)
    mine = [set(stream.layout(4, rows)[0].tolist()) for rows in (slice(0, 1), slice(1, 3))]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(stream.indices(4).tolist())


@pytest.fixture(scope="module")
def packed_run(assets, tmp_path_factory):
    """4 steps of 2 micro-batches of 2 rows of 32 tokens (passages of 4..16 tokens), evaluation
    and checkpoints every 2 steps, no teacher cache."""
    out = tmp_path_factory.mktemp("packed") / "run"
    return T.train(_cfg(assets, out, **PACKED))


PACKED = dict(steps=4, batch_size=2, grad_accum=2, pack_length=32, save_every=2, eval_every=2, plot=False,
              teacher_cache="off")


def test_a_packed_run_compiles_one_step_program_and_resumes_exactly(packed_run, assets, tmp_path):
    r = packed_run
    # Passages of 4..16 tokens (unpadded they would need the 8 and 16 buckets): one program.
    assert int(r.state.step) == 4 and r.setup.raw_step.traces == 1
    train = [x for x in r.history if x["kind"] == "train"]
    evals = [x for x in r.history if x["kind"] == "eval"]
    assert [x["step"] for x in evals] == [2, 4] and all(x["tokens"] > 0 for x in evals)
    assert all(x["real_tokens"] > 2 * 2 * 16 for x in train)  # more than one 16-token passage per row
    out = tmp_path / "run"
    first = T.train(_cfg(assets, out, **PACKED), stop_after=2)
    assert int(first.state.step) == 2
    resumed = T.train(_cfg(assets, out, **PACKED))
    assert resumed.resumed_from == 2 and int(resumed.state.step) == 4
    _assert_same(_flat(resumed.state.params), _flat(r.state.params))
    for a, b in zip(jax.tree.leaves(resumed.state.opt_state), jax.tree.leaves(r.state.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Packing changes the data: a run may not resume with another pack_length.
    with pytest.raises(sense_jax.ConfigError, match="pack_length=32, now pack_length=0"):
        T.train(_cfg(assets, out, **dict(PACKED, pack_length=0, steps=5)))


def test_packed_held_out_evaluation_equals_the_unpacked_one(packed_run):
    s = packed_run.setup
    passages = [
        "The bank by the river bank flooded in spring.", "A bat flew.", "He will bank on it.",
        "She sat on the bank.", "Interest rates at the bank rose again this year, as expected."]
    import dataclasses

    # batch_size 2 x eval_batches 3: all 5 passages, in 2 packed rows (one batch) or 3 padded batches
    s = dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, eval_batches=3))
    unpacked = dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, pack_length=0))
    a = T.evaluate(s, packed_run.state.params, passages)
    b = T.evaluate(unpacked, packed_run.state.params, passages)
    assert a["tokens"] == b["tokens"] > 0
    np.testing.assert_allclose([a["accuracy"], a["skd"]], [b["accuracy"], b["skd"]], rtol=1e-5)

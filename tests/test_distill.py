"""SKD losses, students, adaptor, input checks, config and HF export (issue 5)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sense_jax
from sense_jax import distill as D
from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.sense_dict import SenseDictionary, gather_senses
from skd_helpers import make_sense_dict, make_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sense_jax import trainer as T  # noqa: E402


# --- losses against numpy ---------------------------------------------------------------------

def _np_skd(codebook, valid, s, t, mask):
    """Per-token reference: CE(C_t s, argmax C_t h_t) over real slots only, mean over counted."""
    nll, agree = [], []
    B, T_, K, _ = codebook.shape
    for b in range(B):
        for i in range(T_):
            n = int(valid[b, i].sum())
            if not mask[b, i] or n == 0:
                continue
            C = codebook[b, i, :n].astype(np.float64)
            z, y = C @ s[b, i], int(np.argmax(C @ t[b, i]))
            m = z.max()
            nll.append(m + np.log(np.exp(z - m).sum()) - z[y])
            agree.append(float(np.argmax(z) == y))
    return np.mean(nll), np.mean(agree), len(nll)


@pytest.fixture(scope="module")
def small_dict():
    rng = np.random.default_rng(3)
    n = np.array([0, 3, 1, 0, 4, 2, 0, 2])  # tokens 0, 3, 6 have no entry
    off = np.concatenate([[0], np.cumsum(n)])
    return SenseDictionary.from_arrays(rng.normal(size=(off[-1], 6)).astype(np.float32), off)


def test_skd_loss_and_accuracy_match_numpy(small_dict):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, size=(3, 7)).astype(np.int32)
    mask = (rng.random((3, 7)) > 0.2).astype(np.int32)
    s = rng.normal(size=(3, 7, 6)).astype(np.float32)
    t = rng.normal(size=(3, 7, 6)).astype(np.float32)
    cb, valid = jax.jit(gather_senses)(small_dict, jnp.asarray(ids))
    out = jax.jit(D.skd_loss)(cb, valid, jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
    ref_loss, ref_acc, ref_n = _np_skd(np.asarray(cb), np.asarray(valid), s, t, mask)
    assert 0 < ref_n < mask.sum()  # some masked and some entry-less tokens are excluded
    assert float(out["tokens"]) == ref_n
    np.testing.assert_allclose(float(out["skd"]), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(out["accuracy"]), ref_acc, rtol=1e-6)
    # MSE baseline: mean over real tokens of mean_D squared difference.
    mse = jax.jit(D.hidden_mse_loss)(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
    ref_mse = ((s - t) ** 2).mean(-1)[mask.astype(bool)].mean()
    np.testing.assert_allclose(float(mse), ref_mse, rtol=1e-5)
    both = jax.jit(lambda *a: D.distill_losses(*a, skd_weight=0.3, mse_weight=2.0))(
        small_dict, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(float(both["loss"]), 0.3 * ref_loss + 2.0 * ref_mse, rtol=1e-5)


def test_padding_is_never_the_target_even_when_all_real_logits_are_negative():
    # Token 1 has 2 senses, token 2 has 4 (so K_max = 4 and token 1 has 2 padding slots).
    centres = np.array([[-1.0, 0], [-2.0, 0], [1, 0], [0, 1], [1, 1], [-1, -1]], np.float32)
    sd = SenseDictionary.from_arrays(centres, np.array([0, 0, 2, 6]))
    ids = jnp.array([[1]])
    h = jnp.array([[[1.0, 0.0]]])  # real scores -1, -2: a padding logit of 0 would win
    cb, valid = jax.jit(gather_senses)(sd, ids)
    out = jax.jit(D.skd_loss)(cb, valid, h, h, jnp.ones((1, 1)))
    assert float(out["accuracy"]) == 1.0  # y = 0 and argmax z = 0, both real
    # CE over the two real logits only: log(e^-1 + e^-2) - (-1) = log(1 + e^-1).
    np.testing.assert_allclose(float(out["skd"]), np.log1p(np.exp(-1.0)), rtol=1e-6)
    # The reference's bug (padding logit 0) would give a different loss and target.
    z_bug = np.array([-1.0, -2.0, 0.0, 0.0])
    assert np.argmax(z_bug) >= 2
    # Gradients stay finite with -inf padding and entry-less tokens in the batch.
    ids2 = jnp.array([[1, 0, 2]])
    cb2, valid2 = jax.jit(gather_senses)(sd, ids2)
    loss = lambda s: D.skd_loss(cb2, valid2, s, jnp.ones((1, 3, 2)), jnp.ones((1, 3)))["skd"]
    g = jax.jit(jax.grad(loss))(jnp.ones((1, 3, 2)))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g[0, 1]).sum()) == 0.0


def test_gradients_flow_to_the_student_only(small_dict):
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(1, 8, size=(2, 5)), jnp.int32)
    s = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    gs, gt = jax.jit(jax.grad(lambda s, t: D.distill_losses(small_dict, ids, jnp.ones((2, 5)), s, t,
                                                            mse_weight=1.0)["loss"], argnums=(0, 1)))(s, t)
    assert float(jnp.abs(gs).sum()) > 0
    assert float(jnp.abs(gt).sum()) == 0.0


# --- students and adaptor ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory, minilm_dir):
    return sense_jax.load_model(make_teacher(tmp_path_factory.mktemp("t") / "teacher", minilm_dir))


def test_truncated_student_reproduces_the_teachers_first_layers(teacher, sentences):
    b = teacher.tokenizer(sentences[:6], padding=True, return_tensors="np")
    cfg, params = D.truncated_student(teacher.config, teacher.params, 1)
    assert cfg.num_hidden_layers == 1 and "layer_1" not in params and "pooler" not in params
    module = teacher.family.make_module(cfg)
    h = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))(params, b["input_ids"], b["attention_mask"])
    adapted = D.apply_adaptor(D.init_adaptor(32, 32), h)  # identity when widths match
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(h))
    ref = teacher.all_hidden_states(b["input_ids"], b["attention_mask"])[1]
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(ref), atol=2e-6)  # XLA fusion order
    with pytest.raises(ConfigError, match="student_layers=3"):
        D.truncated_student(teacher.config, teacher.params, 3)


def test_fresh_student_is_seeded_and_narrower(teacher):
    cfg, p1 = D.fresh_student(teacher.family, teacher.config, seed=5, num_layers=1, hidden_size=16)
    _, p2 = D.fresh_student(teacher.family, teacher.config, seed=5, num_layers=1, hidden_size=16)
    _, p3 = D.fresh_student(teacher.family, teacher.config, seed=6, num_layers=1, hidden_size=16)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (16, 1, 30522)
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    leaves = lambda p: [np.asarray(x) for x in jax.tree.leaves(p)]
    assert all(np.array_equal(a, b) for a, b in zip(leaves(p1), leaves(p2)))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(p1), leaves(p3)))
    a = D.init_adaptor(16, 32, seed=0)
    assert a["dense"]["kernel"].shape == (16, 32) and float(jnp.abs(a["dense"]["bias"]).sum()) == 0
    with pytest.raises(ConfigError, match="not a multiple"):
        D.fresh_student(teacher.family, teacher.config, 0, hidden_size=20, num_attention_heads=3)


# --- bad input --------------------------------------------------------------------------------

def test_student_with_another_vocabulary_is_refused(tmp_path, teacher, minilm_dir):
    other = sense_jax.load_model(make_teacher(tmp_path / "other", minilm_dir, vocab_size=30000))
    with pytest.raises(ConfigError, match="vocab_size 30000 but teacher has 30522"):
        D.check_same_vocab(teacher, other)
    D.check_same_vocab(teacher, teacher)


def test_sense_dictionary_of_another_teacher_is_refused(teacher, sentences):
    fp = D.teacher_fingerprint(teacher.params, 30522)
    good = make_sense_dict(teacher.tokenizer, sentences, meta={"teacher_fingerprint": fp})
    D.check_sense_dict(good, teacher.config, fingerprint=fp)
    with pytest.raises(SenseJaxError, match="width 48 but the teacher's hidden_size is 32"):
        D.check_sense_dict(make_sense_dict(teacher.tokenizer, sentences, hidden_size=48), teacher.config)
    small = SenseDictionary.from_arrays(np.ones((2, 32), np.float32), np.array([0, 1, 2]))
    with pytest.raises(SenseJaxError, match="vocabulary of 2 tokens"):
        D.check_sense_dict(small, teacher.config)
    alien = make_sense_dict(teacher.tokenizer, sentences, meta={"teacher_fingerprint": "0123456789abcdef"})
    with pytest.raises(SenseJaxError, match="dict_dir: built from teacher .*fingerprint"):
        D.check_sense_dict(alien, teacher.config, fingerprint=fp, source="dict_dir")
    mid = make_sense_dict(teacher.tokenizer, sentences, meta={"layer": 1})
    with pytest.raises(SenseJaxError, match="layer 1 hidden states"):
        D.check_sense_dict(mid, teacher.config)
    elsewhere = make_sense_dict(teacher.tokenizer, sentences, meta={"teacher": str(Path(__file__).parent)})
    with pytest.raises(SenseJaxError, match="built from teacher"):
        D.check_sense_dict(elsewhere, teacher.config, teacher_path=str(teacher.path))
    D.check_sense_dict(elsewhere, teacher.config, teacher_path=str(Path(__file__).parent / "."))


def test_unknown_or_mistyped_config_keys_are_refused(tmp_path, capsys):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"steps": 3, "lerning_rate": 0.1}))
    with pytest.raises(ConfigError, match=r"run.json: unknown config key\(s\) 'lerning_rate' \(did you mean 'learning_rate'"):
        T.load_config(f)
    y = tmp_path / "run.yaml"
    y.write_text("steps: 3\nbatch_size: 2\nfsdp: true\n")
    cfg = T.load_config(y, ["learning_rate=1e-3", "student=fresh"], preset="runlocal")
    assert (cfg.steps, cfg.batch_size, cfg.fsdp, cfg.learning_rate, cfg.student) == (3, 2, True, 1e-3, "fresh")
    assert cfg.max_length == T.PRESETS["runlocal"]["max_length"]
    with pytest.raises(ConfigError, match="'stepz'"):
        T.load_config(None, ["stepz=3"])
    with pytest.raises(ConfigError, match="steps='three'"):
        T.load_config(None, ["steps=three"])
    with pytest.raises(ConfigError, match="metric"):
        T.load_config(None, ["metric=manhattan"])
    from sense_jax.cli import main

    assert main(["distill", "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_key" in err[0] and "Traceback" not in err[0]


# --- export -----------------------------------------------------------------------------------

def _torch_last_hidden(model_dir, batch):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()})


def test_exported_narrow_student_matches_transformers(tmp_path, teacher, minilm_dir, sentences):
    cfg, params = D.fresh_student(teacher.family, teacher.config, seed=1, num_layers=2, hidden_size=16)
    # Perturb every parameter (biases and LayerNorms too) so that each one matters for parity.
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [np.asarray(x) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32)
                                       for x in leaves])
    adaptor = D.init_adaptor(16, 32, seed=2)
    pooler = jax.device_get(teacher.params["pooler"])
    out = D.export_hf(tmp_path / "student", teacher.family, cfg, params, teacher.hf_config,
                      tokenizer_dir=minilm_dir, adaptor=adaptor, pooler=pooler)
    b = dict(teacher.tokenizer(sentences[:8], padding=True, return_tensors="np"))
    ours = np.asarray(teacher.family.make_module(cfg).apply({"params": params}, b["input_ids"],
                                                            b["attention_mask"], b["token_type_ids"]))
    ref = _torch_last_hidden(out, b).last_hidden_state.numpy()
    real = b["attention_mask"].astype(bool)
    assert ref.shape == ours.shape == (8, b["input_ids"].shape[1], 16)
    assert np.abs(ours - ref)[real].max() < 1e-4
    saved = D.load_adaptor(out)
    np.testing.assert_array_equal(saved["weight"], np.asarray(adaptor["dense"]["kernel"]).T)
    np.testing.assert_array_equal(saved["pooler.dense.weight"], np.asarray(pooler["kernel"]).T)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == teacher.tokenizer.get_vocab()


def test_minilm_round_trip_hf_flax_hf_is_bit_exact(tmp_path, minilm_dir):
    from safetensors.numpy import load_file

    from sense_jax.convert import load_hf

    conv, _ = load_hf(minilm_dir)
    student, pooler = D.split_pooler(conv.params)
    out = D.export_hf(tmp_path / "rt", conv.family, conv.config.replace(add_pooler=False), student,
                      conv.hf_config, tokenizer_dir=minilm_dir, pooler=pooler)
    orig = load_file(str(Path(minilm_dir) / "model.safetensors"))
    back = load_file(str(out / "model.safetensors"))
    assert set(back) == set(orig) - {"embeddings.position_ids"}
    for k, v in back.items():
        assert v.dtype == orig[k].dtype and v.shape == orig[k].shape, k
        np.testing.assert_array_equal(v, orig[k], err_msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["hidden_size"] == 384


def test_teacher_fingerprint_covers_the_tokenizer(teacher, tmp_path, sentences):
    from skd_helpers import permute_tokenizer

    perm = sense_jax.load_model(permute_tokenizer(teacher.path, tmp_path / "perm"))
    ids = lambda m: m.tokenizer("The bank by the river.")["input_ids"]
    assert ids(perm) != ids(teacher)  # same weights, same tokens, other ids
    fp, fp_perm = (D.teacher_fingerprint(m.params, 30522, m.tokenizer) for m in (teacher, perm))
    assert fp.startswith("v2-") and fp_perm.startswith("v2-") and fp != fp_perm
    assert D.teacher_fingerprint(teacher.params, 30522) == D.teacher_fingerprint(perm.params, 30522)
    assert D.tokenizer_fingerprint(teacher.tokenizer) != D.tokenizer_fingerprint(perm.tokenizer)
    # A dictionary built from the teacher is refused for the permuted one (it used to train
    # with loss 0.0: every token looked up another token's senses).
    good = make_sense_dict(teacher.tokenizer, sentences, meta={"teacher_fingerprint": fp})
    D.check_sense_dict(good, teacher.config, fingerprint=fp)
    with pytest.raises(SenseJaxError, match=r"senses: built from teacher .*fingerprint v2-.*embedding matrix "
                                            r"and tokenizer.*another teacher or tokenizer"):
        D.check_sense_dict(good, perm.config, fingerprint=fp_perm, source="senses")
    good.save(tmp_path / "senses")
    cfg = T.load_config(None, [f"teacher={perm.path}", f"senses={tmp_path / 'senses'}", "batch_size=2",
                               "max_length=32"])
    with pytest.raises(SenseJaxError, match="another teacher or tokenizer"):
        T.setup(cfg)
    # Dictionaries that predate it (version 1: the embedding matrix only) stay usable, with a
    # warning that their tokenizer cannot be checked; another embedding matrix is still refused.
    old = make_sense_dict(teacher.tokenizer, sentences,
                          meta={"teacher_fingerprint": D.teacher_fingerprint(teacher.params, 30522)})
    with pytest.warns(UserWarning, match="version-1 teacher fingerprint.*tokenizer cannot be checked"):
        D.check_sense_dict(old, perm.config, fingerprint=fp_perm, source="old-senses",
                           embedding_fingerprint=D.teacher_fingerprint(perm.params, 30522))
    with pytest.raises(SenseJaxError, match="of its embedding matrix\\) but"):
        D.check_sense_dict(old, perm.config, fingerprint=fp_perm, embedding_fingerprint="0123456789abcdef")

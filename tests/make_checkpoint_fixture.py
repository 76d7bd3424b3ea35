"""Write ``tests/data/ckpt_v0/``: a tiny SKD run saved by the trainer as it was before issue 12
(commit d43c09a, ``sense_jax/trainer.py`` in one module), so that later code can be checked to
restore checkpoints written before it (tests/test_checkpoint_compat.py).

Run once, from the repository root, with the code whose checkpoints are to be kept::

    PYTHONPATH=$PWD python tests/make_checkpoint_fixture.py tests/data/ckpt_v0

(with the directory given relative to the repository root, so that the run's config and the
checkpoint's ``meta`` record relative paths; Orbax's ``commit_success.txt`` files, which name the
absolute directory they were written to, are then blanked: the suite names no machine's paths,
tests/test_hermetic.py).

What it writes (float32, ~250 KB, most of it Orbax metadata):
  teacher/   a random tiny BERT (D=8, 1 layer, 2 heads) with a WordPiece vocabulary made of
             the words of tests/data/sentences.txt (so its embedding matrix stays small);
  senses/    a random sense dictionary of that teacher (seeded, its fingerprint recorded);
  run/       ``sense-jax distill`` run dir after 2 of 3 steps: checkpoint 2, config.json,
             metrics.jsonl, tokenizer/;
  expected.json  what the same code then did: the step-3 training record of the resumed run,
             and the exported student's parameters' sums (export of the newest checkpoint).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def config_overrides(root: Path, out_dir: Path, steps: int, sentences: Path = HERE / "data" / "sentences.txt"
                     ) -> list[str]:
    """The run's ``--set`` list (shared with the test, which resumes it with steps=3)."""
    kw = dict(teacher=root / "teacher", senses=root / "senses", train_data=sentences,
              out_dir=out_dir, progress=False, plot=False, tensorboard=False, steps=steps, batch_size=4,
              grad_accum=1, max_length=16, student_layers=1, warmup_steps=1, learning_rate=1e-3,
              save_every=2, keep_checkpoints=1, eval_every=0, eval_fraction=0.1)
    return [f"{k}={v}" for k, v in kw.items()]


def make_teacher(out: Path, sentences: list[str]) -> None:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok = BertTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    out.mkdir(parents=True)
    tok.save_pretrained(str(out))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "LayerNorm.weight" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True)


def main(root: str) -> None:
    import sense_jax
    from sense_jax import trainer as T
    from sense_jax.fingerprints import teacher_fingerprint
    from skd_helpers import make_sense_dict

    root = Path(root)
    if root.is_absolute() or not (HERE.parent / "tests" / "data" / "sentences.txt").samefile(
            Path("tests") / "data" / "sentences.txt"):
        raise SystemExit("run from the repository root, with a relative output directory")
    if root.exists():
        raise SystemExit(f"{root} exists")
    sentences = (HERE / "data" / "sentences.txt").read_text(encoding="utf-8").splitlines()
    make_teacher(root / "teacher", sentences)
    teacher = sense_jax.load_model(root / "teacher")
    V = teacher.config.vocab_size
    sd = make_sense_dict(teacher.tokenizer, sentences, hidden_size=8, extra=0,
                         meta={"teacher_fingerprint": teacher_fingerprint(teacher.params, V, teacher.tokenizer)})
    sd.save(root / "senses")
    sentences = Path("tests") / "data" / "sentences.txt"  # relative: the recorded paths name no machine
    T.train(T.load_config(None, config_overrides(root, root / "run", 2, sentences)), log=lambda m: None)
    for f in (root / "run").rglob("commit_success.txt"):
        f.write_text("Checkpoint commit was successful (directory name removed)\n")
    # What this code does next: resume to step 3 (in a scratch copy), export the newest step.
    scratch = root / "scratch"
    shutil.copytree(root / "run", scratch / "run")
    resumed = T.train(T.load_config(None, config_overrides(root, scratch / "run", 3, sentences)),
                      log=lambda m: None)
    T.export_checkpoint(root / "run", scratch / "hf", log=lambda m: None)
    from safetensors.numpy import load_file

    exported = load_file(scratch / "hf" / "model.safetensors")
    expected = {"step3": [r for r in resumed.history if r["kind"] == "train" and r["step"] == 3][0],
                "export_sums": {k: float(np.asarray(v, np.float64).sum()) for k, v in sorted(exported.items())}}
    (root / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main(sys.argv[1])

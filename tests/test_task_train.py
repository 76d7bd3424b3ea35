"""Fine-tuning and task distillation (issue 13 items 3-4): labelled batches, the task step."""

from __future__ import annotations

import numpy as np
import pytest

from sense_jax.task_train import ExampleStream, eval_batches, tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


PAIRS = ([f"the bank number {i} of the river" for i in range(11)],
         [f"a loan from bank {i}" + " again" * (i % 4) for i in range(11)])


def test_pairs_are_tokenised_as_transformers_pairs_with_token_types(tokenizer):
    b = tokenize_examples(tokenizer, [PAIRS[0][:3], PAIRS[1][:3]], 24, batch_size=4)
    ref = tokenizer(PAIRS[0][:3], PAIRS[1][:3], truncation=True, max_length=24, padding="max_length",
                    return_tensors="np")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert b[k].shape == (4, 24) and b[k].dtype == np.int32
        np.testing.assert_array_equal(b[k][:3], ref[k])
        np.testing.assert_array_equal(b[k][3], ref[k][0])  # a padding row repeats a real example
    assert b["token_type_ids"][0].max() == 1


def test_example_stream_sees_every_example_once_per_epoch_with_its_label(tokenizer):
    labels = np.arange(11) % 3
    s = ExampleStream(PAIRS, labels, tokenizer, batch_size=4, max_length=32, seed=0, group_window=2)
    seen = np.concatenate([s.indices(j) for j in range(s.per_epoch)])
    assert set(seen.tolist()) == set(range(11)) and len(seen) == 12
    mb = s.micro_batch(1)
    idx = s.indices(1)
    np.testing.assert_array_equal(mb["labels"], labels[idx])
    assert mb["labels"].dtype == np.int32 and mb["weights"].tolist() == [1.0] * 4
    ref = tokenize_examples(tokenizer, [[PAIRS[0][i] for i in idx], [PAIRS[1][i] for i in idx]], 32)
    np.testing.assert_array_equal(mb["input_ids"], ref["input_ids"])
    floats = ExampleStream(PAIRS[:1], labels.astype(np.float64) / 2, tokenizer, 4, 32, 0)
    assert floats.micro_batch(0)["labels"].dtype == np.float32


def test_eval_batches_cover_every_example_once_and_weigh_padding_rows_zero(tokenizer):
    labels = np.arange(11)
    got, rows = [], 0
    for idx, b in eval_batches(tokenizer, PAIRS, labels, 4, 64):
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] in (16, 24, 32, 48, 64)
        np.testing.assert_array_equal(b["labels"][:len(idx)], labels[idx])
        assert b["weights"].tolist() == [1.0] * len(idx) + [0.0] * (4 - len(idx))
        got += idx.tolist()
        rows += 4
    assert sorted(got) == list(range(11)) and rows == 12

import json

import pytest
import torch

import leantune as lt
from leantune.data import (BatchStream, Example, collate, fit_to_length, load_examples, pack,
                           prepare_dataset)
from leantune.errors import LeantuneError
from helpers import byte_ids, chatml_example, pair_example


@pytest.fixture(scope="module")
def tokenizer():
    return lt.load_tokenizer("tiny-llama")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def labelled_text(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != -100])


def test_prompt_completion_masks_the_prompt(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2=", "completion": "4"},
                                                    {"prompt": "say hi: ", "completion": "hello there"}])
    first, second = load_examples(source, tokenizer, 64)
    eos = tokenizer.eos_token_id
    assert first.input_ids == tokenizer("2+2=")["input_ids"] + tokenizer("4")["input_ids"] + [eos]
    assert first.labels == [-100] * 4 + tokenizer("4")["input_ids"] + [eos]
    assert labelled_text(tokenizer, second) == "hello there<|im_end|>"
    assert (second.input_ids, second.labels) == pair_example("say hi: ", "hello there", eos)
    assert second.loss_tokens() == len("hello there") + 1


def test_chat_learns_only_assistant_turns(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "see you"}]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (example,) = load_examples(source, tokenizer, 256)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered
    assert labelled_text(tokenizer, example) == "hello<|im_end|>\nsee you<|im_end|>\n"
    # the whole mask, token by token, against one written out by hand
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids, labels = chatml_example(messages, im_start, im_end)
    assert example.input_ids == ids
    assert example.labels == labels
    assert example.loss_tokens() == len("hello") + 2 + len("see you") + 2
    # the user's words never carry loss
    assert "bye" not in labelled_text(tokenizer, example)


def test_plain_text_is_cut_into_blocks_with_loss_everywhere(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 5)
    examples = load_examples(str(path), tokenizer, 16)
    assert [len(e) for e in examples] == [16, 16, 16, 2]
    assert all(e.labels == e.input_ids for e in examples)  # loss on every token
    ids = byte_ids("abcdefghij" * 5)
    assert [e.input_ids for e in examples] == [ids[0:16], ids[16:32], ids[32:48], ids[48:50]]
    assert sum(e.loss_tokens() for e in examples) == 15 + 15 + 15 + 1
    assert tokenizer.decode(sum((e.input_ids for e in examples), [])) == "abcdefghij" * 5


def test_plain_text_drops_a_one_token_tail(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("x" * 33)  # a 1-token block has nothing to predict
    assert [len(e) for e in load_examples(str(path), tokenizer, 16)] == [16, 16]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": oops}\n', r"bad\.jsonl, line 3: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"question": "a", "answer": "b"}\n', r"line 2: record has keys 'question', 'answer'"),
    ('{"prompt": "a"}\n', r"line 1: record lacks the key 'completion'"),
    ('{"prompt": "a", "completion": 3}\n', r"line 1: 'completion' must be a string"),
    ('[1, 2]\n', r"line 1: expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"line 1: the conversation has no 'assistant' message"),
    ('{"messages": "hi"}\n', r"line 1: 'messages' must be a non-empty list"),
    ('\n\n', r"bad\.jsonl' holds no examples"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LeantuneError, match=message):
        prepare_dataset(str(path), tokenizer, 64)


def test_missing_file_empty_text_and_unknown_builtin(tmp_path, tokenizer):
    with pytest.raises(LeantuneError, match="'nope.jsonl' does not exist"):
        prepare_dataset("nope.jsonl", tokenizer, 64)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(LeantuneError, match="holds no examples"):
        prepare_dataset(str(empty), tokenizer, 64)
    with pytest.raises(LeantuneError, match="unknown built-in dataset 'humaneval-tests:dev'"):
        prepare_dataset("humaneval-tests:dev", tokenizer, 64)
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LeantuneError, match="not UTF-8"):
        prepare_dataset(str(binary), tokenizer, 64)


def test_a_directory_as_data_file_is_named_as_a_directory(tmp_path, tokenizer):
    (tmp_path / "folder").mkdir()
    with pytest.raises(LeantuneError, match=r"data file '.*folder' is a directory; expected a \.jsonl or plain-text file"):
        prepare_dataset(str(tmp_path / "folder"), tokenizer, 64)


def test_bad_json_gives_file_line_and_the_whole_parser_message(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a\tb", "completion": "c"}\n')
    # the parser's own message is "Invalid control character at" and expects the position after it
    with pytest.raises(LeantuneError, match=r"bad\.jsonl, line 2: not valid JSON \(Invalid control character at column 14\)$"):
        prepare_dataset(str(path), tokenizer, 64)


def test_nothing_left_suggests_truncation_only_where_it_would_help(tmp_path, tokenizer):
    long_prompts = write_jsonl(tmp_path / "long_prompts.jsonl", [{"prompt": "p" * 50, "completion": "c"}])
    for overlong in ("truncate", "drop"):
        with pytest.raises(LeantuneError, match=r"max_length=16 \(1 dropped\); raise max_length \(cut to max_length, "
                                                r"no example keeps a token to learn from\)$"):
            prepare_dataset(long_prompts, tokenizer, 16, overlong=overlong)
    long_completions = write_jsonl(tmp_path / "long_completions.jsonl", [{"prompt": "p", "completion": "c" * 50}])
    with pytest.raises(LeantuneError, match=r"\(1 dropped\); raise max_length or use overlong: truncate$"):
        prepare_dataset(long_completions, tokenizer, 16, overlong="drop")


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    long = Example(list(range(10)), [-100] * 6 + list(range(6, 10)))
    prompt_only_after_cut = Example(list(range(10)), [-100] * 9 + [9])
    short = Example([1, 2, 3], [-100, 2, 3])
    kept, report = fit_to_length([long, prompt_only_after_cut, short], 8, "truncate")
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 1)  # each example counted once
    assert kept[0].input_ids == list(range(8)) and kept[0].labels == [-100] * 6 + [6, 7]
    kept, report = fit_to_length([long, prompt_only_after_cut, short], 8, "drop")
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 2)
    assert kept == [short]


def test_everything_dropped_is_an_error(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 50, "completion": "c"}])
    with pytest.raises(LeantuneError, match="no example is left after fitting to max_length=16"):
        prepare_dataset(source, tokenizer, 16, overlong="drop")


def test_data_with_nothing_to_learn_at_any_length_says_so_rather_than_raise_max_length(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "completion": ""}])
    with pytest.raises(LeantuneError, match="no example has a token to learn from at any length"):
        prepare_dataset(source, tokenizer, 16)


def test_packing_keeps_loss_tokens_and_masks_boundaries():
    # the second example is labelled from its first token on: packed, that token must not be
    # predicted from the end of the first example
    examples = [Example([1, 2, 3], [-100, 2, 3]), Example([4, 5], [4, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])]
    rows = pack(examples, 6)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert rows[0].labels == [-100, 2, 3, -100, 5]
    assert sum(r.loss_tokens() for r in rows) == sum(e.loss_tokens() for e in examples)
    assert all(len(r) <= 6 for r in rows)


def test_collate_pads_right_and_masks_padding():
    batch = collate([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_batch_stream_is_a_deterministic_permutation_per_epoch(group_by_length):
    examples = [Example([i] * (1 + i % 7), [i] * (1 + i % 7)) for i in range(23)]
    stream = BatchStream(examples, batch_size=4, seed=3, pad_id=0, group_by_length=group_by_length)
    again = BatchStream(examples, batch_size=4, seed=3, pad_id=0, group_by_length=group_by_length)
    assert stream.batches_per_epoch == 6
    epoch0 = stream.epoch_order(0)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(23))
    assert epoch0 != stream.epoch_order(1)
    assert again.epoch_order(1) == stream.epoch_order(1) and again.epoch_order(0) == epoch0
    iterator = stream.iterate(start=5)
    for position in range(5, 14):  # crosses into the second epoch
        expected = stream.batch_at(position)
        got = next(iterator)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    if group_by_length:  # length grouping leaves little padding
        padded = sum(int((1 - stream.batch_at(p)["attention_mask"]).sum()) for p in range(6))
        plain = BatchStream(examples, 4, 3, 0, group_by_length=False)
        assert padded <= sum(int((1 - plain.batch_at(p)["attention_mask"]).sum()) for p in range(6))


def test_builtin_humaneval_tests_split(tokenizer):
    examples, report = prepare_dataset("humaneval-tests:test", tokenizer, 4096)
    assert report.kept == len(examples) == 40
    train, _ = prepare_dataset("humaneval-tests", tokenizer, 4096)
    assert len(train) == 124
    text = labelled_text(tokenizer, train[0])
    assert "assert" in text and text.endswith("<|im_end|>")

"""The tokenizer's truth is sentencepiece itself: ids == [BOS] + sp.encode(text), exact round trip."""

import random

import pytest
import sentencepiece as spm
from conftest import TRICKY_TEXTS, run_without_torch

from persimmon_runtime import IncrementalDetokenizer, PersimmonError, Tokenizer, format_chat


@pytest.fixture(scope="module")
def tok(sp_model):
    return Tokenizer(sp_model)


@pytest.fixture(scope="module")
def sp(sp_model):
    return spm.SentencePieceProcessor(model_file=sp_model)


def test_bos_is_the_endoftext_piece(tok, sp):
    assert tok.bos_id == sp.piece_to_id("|ENDOFTEXT|")
    assert sp.id_to_piece(tok.bos_id) == "|ENDOFTEXT|"


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_ids_are_bos_plus_sentencepiece_and_round_trip(tok, sp, text):
    ids = tok.encode(text)
    assert ids == [tok.bos_id] + sp.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == sp.encode(text)


def test_empty_string(tok):
    assert tok.encode("") == [tok.bos_id]
    assert tok.encode("", add_bos=False) == []
    assert tok.decode([]) == ""


def test_bos_convention_is_configurable(sp_model):
    original_server = Tokenizer(sp_model, add_bos=False)
    assert original_server.encode("hello") == spm.SentencePieceProcessor(model_file=sp_model).encode("hello")


def test_decode_restores_bytes_from_byte_pieces(tok, sp):
    ids = tok.encode("🐙")  # not in the training texts: four byte pieces
    assert sum(sp.is_byte(i) for i in ids) == 4
    assert tok.decode(ids) == "🐙"


@pytest.mark.parametrize("text", ["|ENDOFTEXT|", "a |ENDOFTEXT| b", "|ENDOFTEXT||ENDOFTEXT|"])
def test_user_text_never_becomes_a_special_token(sp_model, sp_model_user_defined, text):
    for model in (sp_model, sp_model_user_defined):
        tok = Tokenizer(model)
        ids = tok.encode(text)
        assert tok.bos_id not in ids[1:], model
        assert tok.decode(ids) == text


def test_user_defined_special_is_respelled_but_other_text_is_sentencepiece(sp_model_user_defined):
    tok = Tokenizer(sp_model_user_defined)
    sp = spm.SentencePieceProcessor(model_file=sp_model_user_defined)
    assert tok.bos_id in sp.encode("x |ENDOFTEXT| y")  # sentencepiece alone would parse it
    assert tok.encode("plain text, no specials") == [tok.bos_id] + sp.encode("plain text, no specials")


def test_ids_past_the_vocabulary_decode_to_nothing(tok):
    # The model has more embedding rows than the tokenizer has pieces (like the real 262144).
    assert tok.decode(tok.encode("hi") + [tok.vocab_size, tok.vocab_size + 100]) == "hi"


def _stream(tok, ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.push(i) for i in ids]
    return pieces, pieces + [detok.finish()]


@pytest.mark.parametrize("text", [t for t in TRICKY_TEXTS if t])
def test_streaming_pieces_join_to_the_full_decode_and_never_split_a_character(tok, text):
    ids = tok.encode(text)
    pieces, all_pieces = _stream(tok, ids)
    assert "".join(all_pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_after_a_prompt_keeps_the_leading_space(tok):
    prompt = tok.encode("human: hi\n\nadept:")
    full = tok.encode("human: hi\n\nadept: Paris is 🎉 nice")
    assert full[:len(prompt)] == prompt
    _, pieces = _stream(tok, full[len(prompt):], prompt)
    assert "".join(pieces) == " Paris is 🎉 nice"
    assert pieces[0].startswith(" ")


def test_streaming_random_ids_matches_decode(tok):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        _, pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)


def test_from_dir_reads_tokenizer_config(tmp_path, sp_model):
    (tmp_path / "tokenizer.model").write_bytes(open(sp_model, "rb").read())
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false, "bos_token": {"content": "|ENDOFTEXT|"}}')
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.add_bos is False and tok.encode("hi") == tok.sp.encode("hi")


def test_bad_tokenizer_files_give_clear_errors(tmp_path):
    with pytest.raises(PersimmonError, match="no tokenizer model"):
        Tokenizer.from_dir(str(tmp_path))
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(PersimmonError, match="not a sentencepiece model"):
        Tokenizer(str(bad))


def test_chat_format():
    assert format_chat("Hi?") == "human: Hi?\n\nadept:"
    assert format_chat(["Hi?", "Hello.", "How are you?"]) == \
        "human: Hi?\n\nadept: Hello.\n\nhuman: How are you?\n\nadept:"
    assert format_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "human", "content": "c"}]) == "human: a\n\nadept: b\n\nhuman: c\n\nadept:"
    with pytest.raises(PersimmonError, match="last turn"):
        format_chat(["a", "b"])
    with pytest.raises(PersimmonError, match="alternate"):
        format_chat([{"role": "adept", "content": "x"}])
    with pytest.raises(PersimmonError, match="empty"):
        format_chat([])


def test_runtime_works_without_torch(sp_model):
    result = run_without_torch(f"""
        import persimmon_runtime
        tok = persimmon_runtime.Tokenizer({sp_model!r})
        text = persimmon_runtime.format_chat("hi 🎉")
        assert tok.decode(tok.encode(text)) == text
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_length_bound_holds_for_normalizers_that_shrink_text(tmp_path):
    """The bound before tokenizing is kv_capacity x the longest piece; under sentencepiece's default
    nmt_nfkc normalization runs of spaces collapse, so it is taken on the normalized text there: an
    indented prompt of 2,000 characters in 8 tokens fits 96, a huge one is still refused."""
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world the quick brown fox"] * 200),
                                   model_writer=model, vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "nfkc.model").write_bytes(model.getvalue())
    tokenizer = Tokenizer(str(tmp_path / "nfkc.model"), add_bos=False, bos_token=None)
    indented = "hello" + " " * 2000 + "world"
    tokenizer.check_length("prompt 0", indented, 96, "kv_capacity")
    assert len(tokenizer.encode(indented)) <= 96
    with pytest.raises(PersimmonError, match=r"prompt 0 has 1,000,000 characters \(1,000,001 after the tokenizer's "
                                             r"normalization\), more than 96 tokens can hold"):
        tokenizer.check_length("prompt 0", "x" * 1_000_000, 96, "kv_capacity")

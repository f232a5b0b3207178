"""Nothing corrupt is served: checksums at load (remembered per file), a validated manifest,
NaN/inf weights refused by the build, and every backend step bounded by the KV cache."""

import json
import math
import os
import shutil
import time

import numpy as np
import pytest
from conftest import error_line
from manifest_parts import engine_dict, engine_section
from safetensors.torch import load_file, save_file

from persimmon_export.build import build
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.graph.export import ExportError
from persimmon_export.options import BuildOptions
from persimmon_runtime import cli, verify
from persimmon_runtime.backends.step import check_step
from persimmon_runtime.backends.tensorrt import TensorRTBackend
from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import FORMAT_VERSION, Manifest, ManifestError, OutdatedBuildError
from persimmon_runtime.verify import IntegrityError

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
CAPACITY = 64
DATA = "model.onnx.data"
# every file a float build lists in its manifest (each is hashed once, until it changes)
LISTED = ["model.onnx", DATA, "tokenizer.model", "tokenizer_config.json", "genai_config.json"]


@pytest.fixture(autouse=True)
def private_records(tmp_path, monkeypatch):
    """Each test keeps its verification records to itself (and out of the user's ~/.cache)."""
    monkeypatch.setenv(verify.CACHE_DIR_ENV, str(tmp_path / "records"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_demo_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), **TINY)


@pytest.fixture(scope="module")
def build_dir(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("build") / "fp16")
    build(checkpoint, out, BuildOptions(dtype="float16", max_batch=2, kv_capacity=CAPACITY, backend="onnxruntime"))
    return out


@pytest.fixture
def copy(build_dir, tmp_path):
    """A private copy of the build to damage (fresh files, so never recorded as verified)."""
    return str(shutil.copytree(build_dir, tmp_path / "build"))


@pytest.fixture(scope="module")
def aged_copies(build_dir, tmp_path_factory):
    """Copies whose files are older than the racy margin, so that a verification is recorded.

    One wait for all the tests that need it: a file changed less than RACY_MARGIN_NS before it
    was hashed is re-hashed at the next load (its timestamps could hide a same-size rewrite).
    """
    root = tmp_path_factory.mktemp("aged")
    copies = {name: str(shutil.copytree(build_dir, root / name))
              for name in ("unchanged", "restored", "touched", "manifest")}
    time.sleep(verify.RACY_MARGIN_NS / 1e9 + 0.2)
    return copies


@pytest.fixture
def hash_calls(monkeypatch):
    """Counts the files hashed (the real hash still runs and decides)."""
    calls = []
    real = verify.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(verify, "sha256_file", counting)
    return calls


def overwrite(path, offset, data):
    """Change bytes in place: same file, same size."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    assert os.path.getsize(path) == size


def flip_bytes(path, offset=None, count=8):
    offset = os.path.getsize(path) // 2 if offset is None else offset
    with open(path, "rb") as f:
        f.seek(offset)
        original = f.read(count)
    overwrite(path, offset, bytes(b ^ 0xFF for b in original))


def one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in message and message
    return message


def run_cli(capsys, *argv):
    code = cli.main([*argv, "--max-new-tokens", "2", "--device", "cpu"])
    return code, capsys.readouterr().err


# ---- corrupt files are not served ----

@pytest.mark.parametrize("name, damage", [
    (DATA, "flip"), (DATA, "nan"), (DATA, "first byte"), (DATA, "last byte"),
    ("model.onnx", "flip"), ("tokenizer.model", "flip"),
])
def test_same_size_corruption_is_refused(copy, capsys, name, damage):
    path = os.path.join(copy, name)
    if damage == "nan":  # fp16 NaN (0x7e00) over 64 weights, 64-byte aligned like the tensors
        overwrite(path, (os.path.getsize(path) // 2) & ~63, b"\x00\x7e" * 64)
    elif damage == "first byte":
        flip_bytes(path, 0, 1)
    elif damage == "last byte":
        flip_bytes(path, os.path.getsize(path) - 1, 1)
    else:
        flip_bytes(path)
    with pytest.raises(IntegrityError) as error:
        Generator.load(copy)
    assert f"{name}: sha256" in one_line(error) and "differs from the manifest" in str(error.value)
    code, err = run_cli(capsys, copy, "hello")
    assert code == 2 and error_line(err).startswith("persimmon-run: error: ")
    assert f"{name}: sha256" in error_line(err)


def test_no_verify_is_an_explicit_opt_out(copy, hash_calls):
    flip_bytes(os.path.join(copy, DATA))
    Generator.load(copy, verify_checksums=False)  # the user said so: loads (and serves what it holds)
    assert hash_calls == []
    with pytest.raises(IntegrityError):
        Generator.load(copy)


def test_the_cli_verifies_by_default_and_offers_no_verify(copy, hash_calls, capsys):
    assert run_cli(capsys, copy, "hello", "--no-verify")[0] == 0
    assert hash_calls == []
    assert run_cli(capsys, copy, "hello")[0] == 0
    assert len(hash_calls) == len(LISTED)


def test_corrupt_engine_is_refused_without_tensorrt(copy):
    """Every listed file is checked, whichever backend will read it: here a (fake) engine."""
    engine = os.path.join(copy, "engine.plan")
    with open(engine, "wb") as f:
        f.write(os.urandom(4096))
    manifest_path = os.path.join(copy, "manifest.json")
    raw = json.load(open(manifest_path))
    raw["files"]["engine.plan"] = {"bytes": 4096, "sha256": verify.sha256_file(engine)}
    raw["tensorrt"] = engine_dict()
    json.dump(raw, open(manifest_path, "w"))
    Manifest.load(copy)
    flip_bytes(engine)
    with pytest.raises(IntegrityError, match=r"engine\.plan: sha256"):
        Generator.load(copy, backend="onnxruntime")


def test_size_changes_are_refused_even_without_verification(copy):
    with open(os.path.join(copy, DATA), "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data: \d+ bytes, the manifest says"):
        Generator.load(copy, verify_checksums=False)
    os.remove(os.path.join(copy, DATA))
    os.mkdir(os.path.join(copy, DATA))
    with pytest.raises(IntegrityError, match="not a regular file"):
        Manifest.load(copy, verify_checksums=False)


# ---- verified once, re-hashed only after a change ----

def test_an_unchanged_build_is_hashed_once(aged_copies, hash_calls):
    build = aged_copies["unchanged"]
    Generator.load(build)
    assert sorted(hash_calls) == sorted(LISTED)
    hash_calls.clear()
    Generator.load(build)
    Manifest.load(build)
    assert hash_calls == []


def test_a_same_size_rewrite_with_the_old_mtime_is_caught(aged_copies, hash_calls):
    build = aged_copies["restored"]
    Manifest.load(build)
    path = os.path.join(build, DATA)
    before = os.stat(path)
    flip_bytes(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back; ctime cannot be
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns
    hash_calls.clear()
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data: sha256"):
        Generator.load(build)
    assert hash_calls == [DATA]  # the unchanged files stay verified


def test_a_touched_file_is_verified_again(aged_copies, hash_calls):
    build = aged_copies["touched"]
    Manifest.load(build)
    path = os.path.join(build, "tokenizer.model")
    hash_calls.clear()
    os.utime(path)  # same content: verified again and accepted
    Manifest.load(build)
    assert hash_calls == ["tokenizer.model"]
    flip_bytes(path, 0, 1)
    os.utime(path)
    with pytest.raises(IntegrityError, match=r"tokenizer\.model: sha256"):
        Manifest.load(build)


def test_a_file_written_while_it_is_hashed_is_refused(copy, monkeypatch):
    """A writer that finishes during the hash: the digest is of neither version, so no verdict."""
    real = verify.sha256_file

    def hash_then_writer_finishes(path, *args, **kwargs):
        digest = real(path, *args, **kwargs)
        if path.endswith(DATA):
            flip_bytes(path)
        return digest

    monkeypatch.setattr(verify, "sha256_file", hash_then_writer_finishes)
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data: changed while it was being verified") as error:
        Manifest.load(copy)
    one_line(error)


def test_fresh_files_are_not_recorded(copy, hash_calls):
    """Files changed within the racy margin could be rewritten unseen in the same timestamp tick."""
    for name in os.listdir(copy):
        os.utime(os.path.join(copy, name))  # changed just now (ctime), whatever the machine's load
    Manifest.load(copy)
    Manifest.load(copy)
    assert len(hash_calls) == 2 * len(LISTED)


def test_a_new_manifest_discards_the_record(aged_copies, hash_calls):
    build = aged_copies["manifest"]
    Manifest.load(build)
    Manifest.load(build)
    assert len(hash_calls) == len(LISTED)
    with open(os.path.join(build, "manifest.json"), "a") as f:
        f.write(" ")  # same contents to JSON, another manifest to the record
    Manifest.load(build)
    assert len(hash_calls) == 2 * len(LISTED)


@pytest.mark.parametrize("where", ["a file", "shared"])
def test_unusable_record_folders_only_cost_a_rehash(aged_copies, hash_calls, tmp_path, monkeypatch, where):
    records = tmp_path / "elsewhere"
    if where == "a file":
        records.write_text("not a folder")
    else:  # others could forge records there: not trusted, not written
        (records / "verified").mkdir(parents=True)
        os.chmod(records / "verified", 0o777)
    monkeypatch.setenv(verify.CACHE_DIR_ENV, str(records))
    for _ in range(2):
        Manifest.load(aged_copies["unchanged"])
    assert len(hash_calls) == 2 * len(LISTED)
    if where == "shared":
        assert os.listdir(records / "verified") == []


@pytest.mark.parametrize("garbage", ['{"manifest_sha256": [1], "files": "x"' + "[" * 50000, "[" * 50000,
                                     '{"manifest_sha256": null, "files": {"model.onnx": 1}}', "\xff"])
def test_a_garbage_record_is_ignored(aged_copies, hash_calls, garbage):
    build = aged_copies["unchanged"]
    Manifest.load(build)
    (record,) = os.listdir(verify.records_dir())
    with open(os.path.join(verify.records_dir(), record), "w") as f:
        f.write(garbage)
    Manifest.load(build)
    assert len(hash_calls) == 2 * len(LISTED)


# ---- hostile manifests: one ManifestError line naming the field ----

def _set(path, value):
    def mutate(raw):
        *parents, last = path
        target = raw
        for key in parents:
            target = target[key]
        target[last] = value
    return mutate


def _delete(path):
    def mutate(raw):
        *parents, last = path
        target = raw
        for key in parents:
            target = target[key]
        del target[last]
    return mutate


HOSTILE = [
    ("files as a list", _set(["files"], ["model.onnx"]), "field files must be an object, got list"),
    ("files null", _set(["files"], None), "field files must be an object"),
    ("files missing", _delete(["files"]), "field files is missing"),
    ("file entry a string", _set(["files", "model.onnx"], "abc"), r"field files\['model.onnx'\] must be an object"),
    ("sha256 an int", _set(["files", "model.onnx", "sha256"], 7), r"files\['model.onnx'\].sha256 must be 64"),
    ("sha256 upper case", _set(["files", "model.onnx", "sha256"], "A" * 64), "sha256 must be 64 lowercase hex"),
    ("sha256 short", _set(["files", "model.onnx", "sha256"], "ab"), "sha256 must be 64"),
    ("bytes missing", _delete(["files", "model.onnx", "bytes"]), r"files\['model.onnx'\].bytes is missing"),
    ("bytes negative", _set(["files", "model.onnx", "bytes"], -1), "bytes must be an integer in 0.."),
    ("bytes a float", _set(["files", "model.onnx", "bytes"], 10.0), "bytes must be an integer"),
    ("bytes a bool", _set(["files", "model.onnx", "bytes"], True), "bytes must be an integer"),
    ("bytes a string", _set(["files", "model.onnx", "bytes"], "10"), "bytes must be an integer"),
    ("file name with a slash", _set(["files", "../../etc/passwd"], {"bytes": 1, "sha256": "0" * 64}),
     "files lists '../../etc/passwd', which is not a file name"),
    ("file name '..'", _set(["files", ".."], {"bytes": 1, "sha256": "0" * 64}), "files lists '..'"),
    ("file name not valid Unicode", _set(["files", "\ud800x"], {"bytes": 1, "sha256": "0" * 64}),
     r"files lists '\\ud800x'"),
    ("kv_capacity missing", _delete(["kv_capacity"]), "field kv_capacity is missing"),
    ("kv_capacity a string", _set(["kv_capacity"], "128"), "field kv_capacity must be an integer in 1.."),
    ("kv_capacity a bool", _set(["kv_capacity"], True), "field kv_capacity must be an integer"),
    ("kv_capacity zero", _set(["kv_capacity"], 0), "field kv_capacity must be an integer in 1.."),
    ("kv_capacity huge", _set(["kv_capacity"], 10**30), "field kv_capacity must be an integer in 1.."),
    ("kv_capacity a list", _set(["kv_capacity"], [128]), r"field kv_capacity must be an integer in 1\.\.\d+, got list"),
    ("max_batch negative", _set(["max_batch"], -4), "field max_batch must be an integer"),
    ("dtype unknown", _set(["dtype"], "float8"), "field dtype must be 'float16' or 'bfloat16' or 'float32'"),
    ("dtype a number", _set(["dtype"], 16), "field dtype must be"),
    ("model a list", _set(["model"], [1, 2]), "field model must be an object, got list"),
    ("model a string", _set(["model"], "persimmon"), "field model must be an object, got str"),
    ("vocab_size missing", _delete(["model", "vocab_size"]), "field model.vocab_size is missing"),
    ("head_dim null", _set(["model", "head_dim"], None), "field model.head_dim must be an integer"),
    ("layers a float", _set(["model", "num_hidden_layers"], 2.5), "model.num_hidden_layers must be an integer"),
    ("tokenizer a string", _set(["tokenizer"], "tokenizer.model"), "field tokenizer must be an object"),
    ("tokenizer file a path", _set(["tokenizer", "file"], "../../../etc/passwd"),
     "field tokenizer.file must be a file name in the build directory"),
    ("tokenizer file absolute", _set(["tokenizer", "file"], "/etc/passwd"), "tokenizer.file must be a file name"),
    ("tokenizer file unlisted", _set(["tokenizer", "file"], "other.model"),
     "tokenizer.file is 'other.model', which `files` does not list"),
    ("add_bos a string", _set(["tokenizer", "add_bos"], "yes"), "field tokenizer.add_bos must be true or false"),
    ("bos_token a number", _set(["tokenizer", "bos_token"], 7), "field tokenizer.bos_token must be a string"),
    ("eos_token missing", _delete(["tokenizer", "eos_token"]), "field tokenizer.eos_token is missing"),
    ("eos ids a string", _set(["eos_token_ids"], "2"), "field eos_token_ids must be a list"),
    ("eos id negative", _set(["eos_token_ids"], [-1]), r"field eos_token_ids\[0\] must be an integer in 0"),
    ("eos id past vocab", _set(["eos_token_ids"], [10**6]), "eos_token_ids has an id >= vocab_size"),
    ("onnx null", _set(["onnx"], None), "field onnx must be an object, got NoneType"),
    ("onnx file unlisted", _set(["onnx", "file"], "evil.onnx"), "onnx.file is 'evil.onnx', which `files`"),
    ("onnx data file missing", _delete(["onnx", "data_file"]), "field onnx.data_file is missing"),
    ("cache layout unknown", _set(["onnx", "cache_layout"], "diagonal"), "field onnx.cache_layout must be"),
    ("onnx opset recorded", _set(["onnx", "opset"], 24), "unknown field 'onnx.opset'"),
    ("layers unlike the caches", _set(["model", "num_hidden_layers"], 3),
     "onnx.cache_aliases pairs 2 caches, but model.num_hidden_layers 3 needs 6"),
    ("onnx unknown field", _set(["onnx", "relu2_scale"], 16.0), "unknown field 'onnx.relu2_scale'"),
    ("model unknown field", _set(["model", "hidden_size"], 32), "unknown field 'model.hidden_size'"),
    ("custom op domain", _set(["onnx", "custom_ops", "domain"], "evil"), "field onnx.custom_ops.domain must be "
                                                                          "'persimmon'"),
    ("custom op unknown", _set(["onnx", "custom_ops", "ops"], ["Exec"]), r"field onnx.custom_ops.ops\[0\] must be"),
    ("custom ops missing", _delete(["onnx", "custom_ops"]), "field onnx.custom_ops is missing"),
    ("inputs an object", _set(["onnx", "inputs"], {}), "field onnx.inputs must be a list, got dict"),
    ("input without a name", _delete(["onnx", "inputs", 0, "name"]), r"field onnx.inputs\[0\].name is missing"),
    ("input dtype unknown", _set(["onnx", "inputs", 0, "dtype"], "uint4"), r"field onnx.inputs\[0\].dtype must be"),
    ("int8 cache in a float16 build", _set(["onnx", "inputs", 2, "dtype"], "int8"),
     r"onnx cache 'past_key_0' is int8, but a float16 build's caches are float16;"),
    ("input shape with a float", _set(["onnx", "inputs", 1, "shape"], [1.5]),
     r"field onnx.inputs\[1\].shape\[0\] must be"),
    ("input shape negative", _set(["onnx", "inputs", 1, "shape"], [-2]),
     r"onnx.inputs\[1\].shape\[0\] must be a dimension"),
    ("no attention_mask", _set(["onnx", "inputs", 1, "name"], "mask"), "onnx.inputs lacks 'attention_mask'"),
    ("no input_ids", _set(["onnx", "inputs", 0, "name"], "tokens"), "onnx.inputs lacks 'input_ids'"),
    ("outputs a string", _set(["onnx", "outputs"], "logits"), "field onnx.outputs must be a list"),
    ("cache aliases a list", _set(["onnx", "cache_aliases"], []),
     "field onnx.cache_aliases must be an object, got list"),
    ("cache alias to nothing", _set(["onnx", "cache_aliases", "present_key_0"], "nothing"),
     "cache_aliases maps 'present_key_0' -> 'nothing'"),
    ("cache alias a number", _set(["onnx", "cache_aliases", "present_key_0"], 0),
     r"field onnx.cache_aliases\['present_key_0'\] must be a string"),
    ("tensorrt a list", _set(["tensorrt"], []), "field tensorrt must be an object, got list"),
    ("tensorrt missing", _delete(["tensorrt"]), "field tensorrt is missing"),
    ("tensorrt without engine", _set(["tensorrt"], {k: v for k, v in engine_dict().items() if k != "engine_file"}),
     "field tensorrt.engine_file is missing"),
    ("tensorrt engine unlisted", _set(["tensorrt"], engine_dict()),
     "tensorrt.engine_file is 'engine.plan', which `files` does not list"),
    ("tensorrt prefill zero", _set(["tensorrt"], engine_dict(engine_file="model.onnx", max_prefill=0)),
     "field tensorrt.max_prefill must be an integer in 1"),
    ("tensorrt flavor unknown", _set(["tensorrt"], engine_dict(engine_file="model.onnx", flavor="tensorflow")),
     "field tensorrt.flavor must be 'tensorrt' or 'tensorrt-rtx'"),
    ("tensorrt cache update unknown", _set(["tensorrt"], engine_dict(engine_file="model.onnx", cache_update="copy")),
     "field tensorrt.cache_update must be"),
    ("tensorrt trtexec a number", _set(["tensorrt"], engine_dict(engine_file="model.onnx", trtexec=7)),
     "field tensorrt.trtexec must be a string"),
    ("profiles as indices", _set(["tensorrt"], engine_dict(engine_file="model.onnx", profiles=[{}, {}])),
     r"field tensorrt.profiles\[0\].role is missing"),
    ("profile role unknown", _set(["tensorrt"], engine_dict(
        engine_file="model.onnx", profiles=[{"role": "warmup", "shapes": {}}])),
     r"tensorrt.profiles\[0\].role must be"),
    ("profile roles twice", _set(["tensorrt"], engine_dict(
        engine_file="model.onnx", profiles=[{"role": "prefill", "shapes": {}}] * 2)),
     r"tensorrt.profiles has roles \['prefill', 'prefill'\], expected one each of \['prefill', 'decode'\]"),
    ("profile shapes two", _set(["tensorrt"], engine_dict(
        engine_file="model.onnx", profiles=[{"role": "prefill", "shapes": {"input_ids": [[1, 1], [2, 2]]}},
                                            {"role": "decode", "shapes": {}}])),
     r"field tensorrt.profiles\[0\].shapes\['input_ids'\] must be a list of 3 shapes"),
    ("profile shape negative", _set(["tensorrt"], engine_dict(
        engine_file="model.onnx", profiles=[{"role": "prefill", "shapes": {"input_ids": [[1], [2], [-3]]}},
                                            {"role": "decode", "shapes": {}}])),
     r"field tensorrt.profiles\[0\].shapes\['input_ids'\]\[2\]\[0\] must be an integer in 0"),
    ("exporter_version a number", _set(["exporter_version"], 1), "field exporter_version must be a string"),
    ("unknown field", _set(["run_this"], "rm -rf /"), "unknown field 'run_this'"),
    ("format_version a string", _set(["format_version"], "2"),
     f"format_version str '2', this runtime reads {FORMAT_VERSION}"),
    ("format_version true", _set(["format_version"], True), "format_version bool True"),
    ("format_version newer", _set(["format_version"], FORMAT_VERSION + 1),
     f"format_version int {FORMAT_VERSION + 1}, this runtime reads {FORMAT_VERSION}; upgrade persimmon_runtime"),
    ("format_version 1", _set(["format_version"], 1), "format_version 1 is from an older persimmon-export"),
    ("format missing", _delete(["format"]), "not a persimmon-build manifest"),
    ("long garbage value", _set(["dtype"], "x" * 10000),
     r"field dtype must be 'float16' or 'bfloat16' or 'float32', got str 'xxx"),
]


@pytest.fixture(scope="module")
def good_manifest(build_dir):
    with open(os.path.join(build_dir, "manifest.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name, mutate, message", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_manifest_fields(build_dir, good_manifest, tmp_path, name, mutate, message):
    raw = json.loads(json.dumps(good_manifest))
    mutate(raw)
    directory = tmp_path / "b"
    directory.mkdir()
    (directory / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message) as error:
        Manifest.load(str(directory))
    assert len(one_line(error)) < 400


def _as_format_1(raw: dict) -> dict:
    """The manifest as persimmon-export wrote it before format 2: I/O at the top level, old input name."""
    old = json.loads(json.dumps(raw))
    graph = old["onnx"]
    for key in ("inputs", "outputs", "cache_aliases"):
        old[key] = graph.pop(key)
    old["inputs"][1]["name"] = "cache_position"
    old["format_version"] = 1
    return old


def test_an_older_build_is_refused_with_the_rebuild_command(good_manifest, tmp_path, capsys):
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "manifest.json").write_text(json.dumps(_as_format_1(good_manifest)))
    with pytest.raises(OutdatedBuildError) as error:
        Manifest.load(str(directory))
    assert one_line(error) == (
        f"{directory / 'manifest.json'}: format_version 1 is from an older persimmon-export; this runtime reads "
        f"{FORMAT_VERSION}: rebuild with `persimmon-export build --checkpoint CHECKPOINT --out {directory} "
        f"--overwrite`")
    code, err = run_cli(capsys, str(directory), "hello")
    assert code == 2 and "rebuild with `persimmon-export build" in err and err.strip().count("\n") == 0


def test_a_loaded_manifest_is_typed_and_saves_back_unchanged(build_dir, good_manifest, tmp_path):
    manifest = Manifest.load(build_dir)
    assert manifest.onnx.inputs[1].name == "attention_mask" and manifest.onnx.cache_layout == "capacity"
    assert manifest.model.vocab_size == good_manifest["model"]["vocab_size"] and manifest.tensorrt is None
    manifest.save(str(tmp_path))
    assert json.loads((tmp_path / "manifest.json").read_text()) == good_manifest


def test_save_refuses_what_load_would_refuse(build_dir, tmp_path):
    manifest = Manifest.load(build_dir)
    manifest.tensorrt = engine_section()  # its engine.plan is not in `files`
    with pytest.raises(ManifestError, match="tensorrt.engine_file is 'engine.plan', which `files` does not list"):
        manifest.save(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()


HOSTILE_TEXT = [
    ("empty", b"", "not valid JSON"),
    ("truncated", b'{"format": "persimmon-build", "format_ver', "not valid JSON"),
    ("not UTF-8", b'{"format": "\xff\xfe"}', "not UTF-8 text"),
    ("a list", b"[1, 2, 3]", "not a persimmon-build manifest"),
    ("a string", b'"persimmon-build"', "not a persimmon-build manifest"),
    ("null", b"null", "not a persimmon-build manifest"),
    ("deep nesting", b"[" * 200000, "not valid JSON"),
    ("a 5000-digit number", b'{"format": "persimmon-build", "format_version": ' + b"9" * 5000 + b"}",
     "not valid JSON"),
]


@pytest.mark.parametrize("name, text, message", HOSTILE_TEXT, ids=[case[0] for case in HOSTILE_TEXT])
def test_hostile_manifest_text(tmp_path, name, text, message):
    (tmp_path / "manifest.json").write_bytes(text)
    with pytest.raises(ManifestError, match=message) as error:
        Manifest.load(str(tmp_path))
    assert len(one_line(error)) < 400


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e400", "-0.0"])
def test_json_number_oddities(good_manifest, tmp_path, literal):
    text = json.dumps({**good_manifest, "kv_capacity": "HERE"}).replace('"HERE"', literal)
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match="field kv_capacity must be an integer in 1.."):
        Manifest.load(str(tmp_path))


def test_oversized_or_unreadable_manifests(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b" " * (17 << 20))
    with pytest.raises(ManifestError, match="more than 16,777,216 for a manifest"):
        Manifest.load(str(tmp_path))
    os.remove(tmp_path / "manifest.json")
    os.mkdir(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="manifest.json: is a directory, not a regular file"):
        Manifest.load(str(tmp_path))
    os.rmdir(tmp_path / "manifest.json")
    os.mkfifo(tmp_path / "manifest.json")  # a read would wait for a writer
    with pytest.raises(ManifestError, match="manifest.json: is a FIFO, not a regular file"):
        Manifest.load(str(tmp_path))
    os.remove(tmp_path / "manifest.json")
    os.symlink("/dev/zero", tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="manifest.json: is a device, not a regular file"):
        Manifest.load(str(tmp_path))
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="manifest.json: not found"):
        Manifest.load(str(tmp_path))
    with pytest.raises(ManifestError, match="is not a path"):
        Manifest.load(None)


def test_hostile_manifest_through_the_cli(copy, good_manifest, capsys):
    raw = {**good_manifest, "files": list(good_manifest["files"])}
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        json.dump(raw, f)
    code, err = run_cli(capsys, copy, "hello")
    assert code == 2 and err.count("\n") == 1 and "field files must be an object, got list" in err
    with pytest.raises(ManifestError):
        Generator.load(copy)


def test_the_real_manifest_passes(build_dir):
    manifest = Manifest.load(build_dir)
    assert set(manifest.files) == set(LISTED)


# ---- the build refuses NaN/inf weights ----

TENSOR = "model.layers.0.mlp.dense_4h_to_h.weight"


def _poison(checkpoint, tmp_path, value, name=TENSOR):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(checkpoint, poisoned)
    weights = poisoned / "model.safetensors"
    tensors = load_file(str(weights))
    tensors[name].view(-1)[tensors[name].numel() // 2] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return str(poisoned)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_build_refuses_non_finite_weights(checkpoint, tmp_path, value, dtype):
    poisoned = _poison(checkpoint, tmp_path, value)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=rf"checkpoint tensor '{TENSOR}' holds at least 1 NaN/inf value") as error:
        build(poisoned, str(out), BuildOptions(dtype=dtype, kv_capacity=CAPACITY, backend="onnxruntime"))
    one_line(error)
    assert not out.exists()


def test_build_refuses_weights_that_overflow_float16(checkpoint, tmp_path, monkeypatch):
    # 1e5 > 65504 even unscaled (a W2 of 300 lowers its layer's relu^2 scale instead: test_fp16_range.py)
    poisoned = _poison(checkpoint, tmp_path, 1e5)
    with pytest.raises(ExportError, match=r"mlp_output reaches .* past float16's largest value 65504"):
        build(poisoned, str(tmp_path / "out"), BuildOptions(dtype="float16", kv_capacity=CAPACITY,
                                                            backend="onnxruntime"))
    # without the range report (an fp32 model too large for the machine's memory) the weight itself is refused
    from persimmon_export.graph import ranges

    monkeypatch.setattr(ranges, "available_memory_bytes", lambda: 1)
    with pytest.raises(ExportError, match=rf"'{TENSOR}' has values up to 1e\+05, beyond torch.float16.*--dtype float32"):
        build(poisoned, str(tmp_path / "out"), BuildOptions(dtype="float16", kv_capacity=CAPACITY,
                                                            backend="onnxruntime"))


def test_values_that_round_to_the_float16_limit_are_built(checkpoint, tmp_path):
    poisoned = _poison(checkpoint, tmp_path, 65510 / 256)  # x256 = 65510: rounds to 65504, finite
    build(poisoned, str(tmp_path / "out"), BuildOptions(dtype="float16", kv_capacity=CAPACITY, backend="onnxruntime"))


def test_nan_embedding_is_refused_through_the_cli(checkpoint, tmp_path, capsys):
    from persimmon_export import cli as export_cli

    poisoned = _poison(checkpoint, tmp_path, math.nan, name="model.embed_tokens.weight")
    code = export_cli.main(["build", "--checkpoint", poisoned, "--out", str(tmp_path / "out"), "--kv-capacity", "64",
                            "--backend", "onnxruntime"])
    err = capsys.readouterr().err
    assert code == 2 and "'model.embed_tokens.weight' holds at least 1 NaN/inf" in err
    assert error_line(err)


# ---- every backend bounds its step by the KV cache ----

def _step_args(batch=1, seq=1, position=0, count=None, width=None, ids=None):
    ids = np.full((batch, seq), 5, np.int64) if ids is None else ids
    count = seq if count is None else count
    width = position + count if width is None else width
    return (ids, np.full(batch, position, np.int64), np.full(batch, count, np.int64),
            np.ones((batch, width), np.int64))


BAD_STEPS = [
    ("negative position", dict(position=-1, width=1), "first_slot -1 of row 0 is negative"),
    ("position at capacity", dict(position=CAPACITY, width=CAPACITY),
     f"first_slot {CAPACITY} \\+ 1 new tokens exceeds the KV cache capacity {CAPACITY}"),
    ("two tokens from the last slot", dict(position=CAPACITY - 1, seq=2, width=CAPACITY),
     f"first_slot {CAPACITY - 1} \\+ 2 new tokens exceeds"),
    ("position wrapping int64", dict(position=2**63 - 1, width=1), "exceeds the KV cache capacity"),
    ("prompt longer than the cache", dict(seq=CAPACITY + 1, width=CAPACITY), "0 \\+ 65 new tokens exceeds"),
    ("zero token count", dict(seq=2, count=0, width=2), "token_count 0 of row 0 is outside 1..2"),
    ("token count past seq", dict(seq=2, count=3, width=3), "token_count 3 of row 0 is outside 1..2"),
    ("mask past capacity", dict(width=CAPACITY + 1), f"attention_mask covers {CAPACITY + 1} slots, past"),
    ("mask short of the new token", dict(position=10, width=5), "row 0's last new token is at slot 10"),
    ("token id past vocab", dict(ids=np.array([[10**6]])), "input_ids\\[0, 0\\] = 1000000 is not a token id"),
    ("negative token id", dict(ids=np.array([[-3]])), "input_ids\\[0, 0\\] = -3 is not a token id"),
    ("more rows than started", dict(batch=2), "the backend was started for 1 rows"),
    ("float ids", dict(ids=np.array([[5.0]])), "step input input_ids must be an integer numpy array, got float64"),
    ("empty step", dict(ids=np.zeros((1, 0), np.int64), count=0, width=1), "expected \\(1..1, seq >= 1\\) from row 0"),
]


@pytest.fixture(scope="module")
def onnxruntime_backend(build_dir):
    return Generator.load(build_dir).backend


@pytest.fixture(scope="module")
def tensorrt_step_only(build_dir):
    """The TensorRT backend's own step() without a GPU: built without __init__ (which needs CUDA).

    Its step must refuse bad input before touching anything of the GPU: those attributes do
    not exist here, so reaching them would raise AttributeError instead of PersimmonError.
    """
    backend = TensorRTBackend.__new__(TensorRTBackend)
    backend.manifest, backend.batch = Manifest.load(build_dir), 1
    return backend


@pytest.mark.parametrize("kind", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("name, args, message", BAD_STEPS, ids=[case[0] for case in BAD_STEPS])
def test_backend_steps_refuse_out_of_bounds(request, kind, name, args, message):
    backend = request.getfixturevalue("onnxruntime_backend" if kind == "onnxruntime" else "tensorrt_step_only")
    if kind == "onnxruntime":
        backend.start(1)
    with pytest.raises(PersimmonError, match=message) as error:
        backend.step(*_step_args(**args))
    one_line(error)


def test_step_before_start_and_odd_inputs(build_dir):
    backend = Generator.load(build_dir).backend
    with pytest.raises(PersimmonError, match="step\\(\\) before start\\(\\)"):
        backend.step(*_step_args())
    backend.start(1)
    ids, position, count, mask = _step_args()
    with pytest.raises(PersimmonError, match="step input first_slot must be an integer numpy array, got list"):
        backend.step(ids, [0], count, mask)
    with pytest.raises(PersimmonError, match=r"token_count has shape \(2,\), expected \(1,\)"):
        backend.step(ids, position, np.ones(2, np.int64), mask)
    with pytest.raises(PersimmonError, match="batch 3 is outside 1..max_batch=2"):
        backend.start(3)
    check_step(backend.manifest, 1, *_step_args(position=CAPACITY - 1, width=CAPACITY))  # the last slot is fine


def test_tensorrt_keeps_its_max_prefill_check_after_the_common_one(build_dir):
    backend = TensorRTBackend.__new__(TensorRTBackend)
    backend.manifest, backend.batch = Manifest.load(build_dir), 1
    backend.manifest.tensorrt = engine_section(max_prefill=4)
    with pytest.raises(PersimmonError, match="5 new tokens in one step exceed the engine's max_prefill 4"):
        backend.step(*_step_args(seq=5))


def test_the_last_slot_is_usable_and_refusals_leave_the_backend_working(onnxruntime_backend):
    backend = onnxruntime_backend
    backend.start(2)
    prompt = np.arange(3, 3 + CAPACITY, dtype=np.int64).reshape(1, -1).repeat(2, axis=0)
    ids, position, count, mask = _step_args(batch=2, seq=CAPACITY - 1, ids=prompt[:, :-1])
    assert np.isfinite(backend.step(ids, position, count, mask)).all()
    with pytest.raises(PersimmonError, match="exceeds the KV cache capacity"):
        backend.step(*_step_args(batch=2, position=CAPACITY, width=CAPACITY))
    logits = backend.step(*_step_args(batch=2, position=CAPACITY - 1, ids=prompt[:, -1:]))
    assert logits.shape == (2, backend.manifest.model.vocab_size) and np.isfinite(logits).all()


def _field_paths(section: dict, prefix: str = "") -> set[str]:
    """Dotted names of a manifest's fields: sections are walked into, maps keyed by data (files,
    aliases) are fields themselves."""
    paths = set()
    for key, value in section.items():
        path = prefix + key
        if isinstance(value, dict) and key not in ("files", "cache_aliases"):
            paths |= _field_paths(value, path + ".")
        else:
            paths.add(path)
    return paths


def test_docs_manifest_md_describes_every_field(good_manifest):
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "manifest.md"), encoding="utf-8").read()
    fields = _field_paths({**good_manifest, "tensorrt": engine_dict()})
    assert not [field for field in sorted(fields) if f"| `{field}` |" not in doc]


@pytest.mark.parametrize("field, value", [("max_batch", 2**31 - 1), ("kv_capacity", 1 << 21)])
def test_sizes_the_runtime_allocates_from_are_bounded_at_load(good_manifest, tmp_path, field, value):
    """A manifest with max_batch 2^31-1 loaded, and the runtime died in an allocation (MemoryError)."""
    from persimmon_runtime.manifest import SIZE_LIMITS, validate

    with pytest.raises(ManifestError, match=rf"field {field} must be an integer in 1\.\.{SIZE_LIMITS[field]}, got"):
        validate("manifest.json", {**good_manifest, field: value})


def test_build_refuses_a_max_batch_past_the_bound(checkpoint, tmp_path):
    with pytest.raises(PersimmonError, match=r"--max-batch must be in 1\.\.1024 .*, got 1000000000"):
        build(checkpoint, str(tmp_path / "b"), BuildOptions(dtype="float32", max_batch=10**9, kv_capacity=32,
                                                            backend="onnxruntime"))
    assert not (tmp_path / "b").exists()


# ---- tampered builds whose checksums were kept consistent ----

def _edit_manifest(build, change, files=()):
    """Apply `change` to the manifest, and re-record the size and sha256 of each of `files` (as one
    who edits a build and its checksums would)."""
    from persimmon_runtime.verify import sha256_file

    path = os.path.join(build, "manifest.json")
    with open(path) as f:
        raw = json.load(f)
    change(raw)
    for name in files:
        raw["files"][name] = {"bytes": os.path.getsize(os.path.join(build, name)),
                              "sha256": sha256_file(os.path.join(build, name))}
    with open(path, "w") as f:
        json.dump(raw, f)


def _with_kv_capacity(raw, slots):
    raw["kv_capacity"] = slots
    for spec in raw["onnx"]["inputs"] + raw["onnx"]["outputs"]:
        if spec["name"].startswith(("past_", "present_")):
            spec["shape"][2] = slots


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.__setitem__("kv_capacity", CAPACITY * 2), r"onnx cache 'present_key_0' has shape .* but model "
                                                                r"and kv_capacity give"),
    (lambda raw: raw["model"].__setitem__("vocab_size", raw["model"]["vocab_size"] + 1), "onnx logits shape"),
    (lambda raw: raw["tokenizer"].__setitem__("bos_token", "\ud800"), "field tokenizer.bos_token must be a string "
                                                                      "of valid Unicode"),
])
def test_a_manifest_that_contradicts_itself_is_refused_at_load(copy, change, message):
    _edit_manifest(copy, change)
    with pytest.raises(ManifestError, match=message) as error:
        Generator.load(copy)
    assert "\n" not in str(error.value)


def test_a_graph_that_contradicts_its_manifest_is_refused_at_load(copy):
    """kv_capacity and the cache shapes edited together: consistent, but not what the graph has;
    the first step failed inside onnxruntime before."""
    _edit_manifest(copy, lambda raw: _with_kv_capacity(raw, CAPACITY * 2))
    with pytest.raises(PersimmonError, match=rf"the graph's 'past_key_0' is tensor\(float16\) \[.*{CAPACITY}.*\], "
                                             rf"the manifest says float16 \[.*{CAPACITY * 2}.*\]; the build is "
                                             rf"inconsistent, rebuild it") as error:
        Generator.load(copy)
    assert "\n" not in str(error.value)


def test_a_garbage_graph_with_its_checksum_is_one_line(copy, capsys):
    with open(os.path.join(copy, "model.onnx"), "wb") as f:
        f.write(b"not a protobuf at all" * 100)
    _edit_manifest(copy, lambda raw: None, files=["model.onnx"])
    code = cli.main([copy, "hello", "--max-new-tokens", "2"])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "model.onnx: onnxruntime" in line and "the build may be damaged" in line

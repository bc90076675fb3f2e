"""The tokenizer's encoder on the chosen device (imports torch and qwen-tts).

The model is loaded through ``qwen_tts.Qwen3TTSTokenizer.from_pretrained`` (the official path)
on the CPU; the decoder, which ``encode`` never uses, is dropped; only the encoder moves to the
GPU. A batch is encoded by the encoder call that ``Qwen3TTSTokenizer.encode`` makes, on waveforms
the worker has already right-padded to whole frames, so each clip's codes do not depend on its
batch neighbours. Five changes leave every code as it is and keep the device busy:

* the convolutions' shape bookkeeping (``stride``, ``kernel_size``, ``padding_total``: 0-d
  integer buffers) stays on the host. On the device, every convolution's padding amount was
  read back with a device synchronisation, about 30 per batch, so the host could never queue
  work ahead of the device;
* the encoder is asked for the 16 codebooks the model keeps instead of computing all 32: a
  residual quantizer's first codebooks do not depend on its later ones;
* the batch goes to the device from pinned memory without a wait, behind the batch before it;
  the worker's collating thread fills that memory, not the thread that launches the encoder;
* each causal convolution pads its input on the left itself (zeros on both sides, the extra
  outputs on the right cut off) instead of convolving a padded copy, and one that pads nothing
  convolves its input as it is: two passes over the activations fewer per convolution, the
  same windows (:func:`pad_inside_convolutions`);
* the encoder's transformer gets its causal mask as one lower-triangle operation, the tensor
  transformers builds element by element (:func:`build_causal_masks_directly`, SDPA only).

Start-up imports only the 12 Hz tokenizer's two modules from qwen-tts (its configuration and
model classes), not the package: ``qwen_tts/__init__.py`` imports the whole TTS model stack and
the 25 Hz tokenizer, which cost most of a job's start-up and which ``encode`` never uses. The
model is then loaded with the calls ``Qwen3TTSTokenizer.from_pretrained`` makes for the 12 Hz
type (the same registration with transformers' ``AutoConfig``/``AutoModel``, the same
``from_pretrained`` reading the released config and weights), so the weights and the codes are
the official ones; the tests compare them with ``Qwen3TTSTokenizer.encode``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import torch

from gpuspool.estimate import CONTEXT_GIB
from gpuspool.extract.headers import FRAME_SAMPLES, MODEL_SAMPLE_RATE

GIB = float(1 << 30)

Codes = npt.NDArray[np.int64]


#: The qwen-tts modules the 12 Hz tokenizer is made of: its configuration and its model.
TOKENIZER_MODULES = (
    "qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2",
    "qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2",
)
#: The model type of the 12 Hz tokenizer's ``config.json``, as qwen-tts registers it.
TOKENIZER_MODEL_TYPE = "qwen3_tts_tokenizer_12hz"
#: Parts of qwen-tts the worker never imports: the TTS model stack and the 25 Hz tokenizer.
TTS_STACK = ("qwen_tts.inference", "qwen_tts.core.models", "qwen_tts.core.tokenizer_25hz")
#: transformers' flags for optional packages that it imports whenever they are installed, for
#: features the encoder never uses: scikit-learn (assisted generation's ``roc_curve``; librosa
#: depends on it, so it is there) and SciPy (the object-detection losses' matching), together a
#: third of the import time of the tokenizer's modules; and torchvision, JAX/Flax and
#: TensorFlow, which its image and video utilities import (through ``modeling_layers`` and
#: ``processing_utils``) on a host where they are installed beside torch.
_UNUSED_OPTIONAL = (
    "_sklearn_available",
    "_scipy_available",
    "_torchvision_available",
    "_flax_available",
    "_jax_available",
    "_tf_available",
)


def import_tokenizer_stack() -> tuple[ModuleType, ModuleType]:
    """Import the 12 Hz tokenizer's modules now, to time it apart; return them (config, model).

    Imports print banners a job log does not need: file descriptors 1 and 2 are sent to a
    temporary file meanwhile, which is replayed on stderr only if the import fails.
    """
    kept = b""
    try:
        with _quiet_stdio() as noise:
            try:
                return _tokenizer_modules()
            except BaseException:
                noise.seek(0)
                kept = noise.read()
                raise
    finally:
        if kept:
            sys.stderr.write(kept.decode("utf-8", "replace"))
            sys.stderr.flush()


def _tokenizer_modules() -> tuple[ModuleType, ModuleType]:
    """The 12 Hz tokenizer's configuration and model modules, imported without qwen-tts's
    package ``__init__`` files (which import the TTS model stack and the 25 Hz tokenizer).

    While they are imported, ``qwen_tts`` and ``qwen_tts.core`` are stand-ins: package modules
    made from their specs but not run, so the import system finds the submodules in the
    installed package. The stand-ins are removed afterwards, so a later ``import qwen_tts``
    (the official wrapper, in a test) runs the real ``__init__`` files, which then reuse these
    very modules from ``sys.modules``: the classes stay the same objects.
    """
    if all(name in sys.modules for name in TOKENIZER_MODULES):
        config, model = (sys.modules[name] for name in TOKENIZER_MODULES)
        return config, model
    _skip_unused_optional_imports()
    stand_ins = _stand_in_packages(("qwen_tts", "qwen_tts.core"))
    try:
        config, model = (importlib.import_module(name) for name in TOKENIZER_MODULES)
    finally:
        _remove_stand_ins(stand_ins)
    return config, model


def _stand_in_packages(names: tuple[str, ...]) -> dict[str, ModuleType]:
    """Put an unexecuted package module in ``sys.modules`` for each of ``names`` (parents
    first) that is not imported yet; return those put there."""
    made: dict[str, ModuleType] = {}
    for name in names:
        if name in sys.modules:
            continue
        parent, _, _ = name.rpartition(".")
        if parent:
            spec = importlib.machinery.PathFinder.find_spec(name, sys.modules[parent].__path__)
        else:
            spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            _remove_stand_ins(made)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        made[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
    return made


def _remove_stand_ins(made: dict[str, ModuleType]) -> None:
    """Take the stand-ins out of ``sys.modules`` (those still there)."""
    for name, module in made.items():
        if sys.modules.get(name) is module:
            del sys.modules[name]


def _skip_unused_optional_imports() -> None:
    """Tell transformers that the optional packages of ``_UNUSED_OPTIONAL`` are absent, before
    it imports the modules that would import them; nothing the encoder runs reads them.

    Left alone if transformers' model code is imported already (its choice is made) or if its
    version has no such flags.
    """
    if "transformers.modeling_utils" in sys.modules:
        return
    import transformers.utils.import_utils as flags

    for name in _UNUSED_OPTIONAL:
        if isinstance(getattr(flags, name, None), bool):
            setattr(flags, name, False)


def load_tokenizer(tokenizer: str, dtype: torch.dtype) -> tuple[Any, int]:
    """Load the 12 Hz tokenizer on the CPU as ``Qwen3TTSTokenizer.from_pretrained`` does for
    that type; return the model and the feature extractor's sampling rate.

    The same calls: register the configuration and model classes with transformers' auto
    classes, read the feature extractor's config, then ``AutoModel.from_pretrained`` (the
    released config and weights, a folder or a hub id). A folder of another model type (the
    25 Hz tokenizer, say) fails here with transformers' message.
    """
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    config_module, model_module = _tokenizer_modules()
    config_class = config_module.Qwen3TTSTokenizerV2Config
    model_class = model_module.Qwen3TTSTokenizerV2Model
    AutoConfig.register(TOKENIZER_MODEL_TYPE, config_class)
    AutoModel.register(config_class, model_class)
    feature_extractor = AutoFeatureExtractor.from_pretrained(tokenizer)  # type: ignore[no-untyped-call]
    model = AutoModel.from_pretrained(tokenizer, device_map="cpu", dtype=dtype)
    if not isinstance(model, model_class):
        raise ValueError(f"{tokenizer} holds a {type(model).__name__}, not the 12 Hz tokenizer")
    return model, int(feature_extractor.sampling_rate)


#: Tokenizers loaded on the CPU before the GPU was given (``prestart``), by (tokenizer, dtype):
#: the next :class:`CodeEncoder` of the same takes its model from here instead of loading it.
_preloaded: dict[tuple[str, torch.dtype], tuple[Any, int]] = {}


def _torch_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def preload_tokenizer(tokenizer: str, dtype: str) -> None:
    """Load the tokenizer on the CPU now, for the :class:`CodeEncoder` made once the GPU is
    given. A failure is left to that encoder's own load, which reports it."""
    torch_dtype = _torch_dtype(dtype)
    with contextlib.suppress(Exception):
        _preloaded[(tokenizer, torch_dtype)] = load_tokenizer(tokenizer, torch_dtype)


@contextlib.contextmanager
def _quiet_stdio() -> Iterator[BinaryIO]:
    """Redirect file descriptors 1 and 2 (children and C libraries included) to a temp file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def resolve_device(spec: str) -> torch.device:
    """``auto`` → first CUDA device if any, else CPU; otherwise ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but CUDA is not available")
        index: int | None = dev.index
        if index is None:
            index = torch.cuda.current_device()
            dev = torch.device("cuda", index)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


class DeviceStart:
    """The device's own start-up, in a thread beside the imports and the model load.

    Creating the CUDA context and loading cuDNN and cuBLAS (a tiny convolution and matrix
    product do that) is driver work and library loading, mostly outside the GIL, that does not
    depend on the model. Serially it came after the model load, in the move to the device and
    the warm-up batch. On the CPU there is nothing to start.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if device.type == "cuda":
            self._thread = threading.Thread(target=self._run, name="device-start", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                x = torch.ones((1, 1, 64), device=self.device)
                torch.nn.functional.conv1d(x, torch.ones((1, 1, 3), device=self.device))
                torch.matmul(x[0].T, x[0])
            torch.cuda.synchronize(self.device)
        except BaseException as exc:  # raised again by wait(), in the thread that loads
            self._error = exc

    def wait(self) -> None:
        """Return once the device has started; raise what stopped it, if anything did."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


@dataclass
class GpuMemory:
    """Peak GPU memory of this process so far (GiB)."""

    max_allocated: float
    max_reserved: float
    context: float
    context_source: str

    @property
    def peak(self) -> float:
        """torch's max allocated plus the CUDA context."""
        return self.max_allocated + self.context

    @property
    def peak_reserved(self) -> float:
        """torch's max reserved plus the CUDA context (what other tenants saw taken)."""
        return self.max_reserved + self.context


#: The largest batch collated straight into page-locked memory (budgets up to about 1,398 s).
PINNED_BATCH_MAX_BYTES = 128 << 20


@dataclass
class Pending:
    """A batch on its way through the encoder."""

    codes: torch.Tensor
    frames: list[int]
    done: Any


class CodeEncoder:
    """Encodes padded 24 kHz waveforms into (frames, 16) code arrays."""

    def __init__(
        self,
        tokenizer: str,
        device: torch.device,
        dtype: str = "fp32",
        started: DeviceStart | None = None,
    ):
        """Load ``tokenizer`` on the CPU and move its encoder to ``device``; ``started`` is the
        device's start-up begun earlier (:class:`DeviceStart`), waited for before the move."""
        self.device = device
        torch_dtype = _torch_dtype(dtype)
        try:
            loaded = _preloaded.pop((tokenizer, torch_dtype), None)
            model, self.sample_rate = loaded or load_tokenizer(tokenizer, torch_dtype)
        except BaseException:
            if started is not None:  # not left inside the driver while the process exits
                with contextlib.suppress(BaseException):
                    started.wait()
            raise
        model.decoder = None  # encode never uses it; keep it off the GPU
        self.frame = int(model.get_encode_downsample_rate())
        if self.sample_rate != MODEL_SAMPLE_RATE or self.frame != FRAME_SAMPLES:
            raise ValueError(
                f"tokenizer encodes {self.sample_rate} Hz with {self.frame} samples a frame; "
                f"this worker supports the 12 Hz tokenizer ({MODEL_SAMPLE_RATE} Hz, "
                f"{FRAME_SAMPLES} samples a frame)"
            )
        if started is not None:
            started.wait()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.model = model.to(device).eval()
        keep_shape_buffers_on_host(self.model.encoder)
        pad_inside_convolutions(self.model.encoder)
        build_causal_masks_directly(self.model.encoder.encoder_transformer)
        self.num_quantizers = int(model.encoder_valid_num_quantizers)
        self.dtype = self.model.dtype
        self._context: tuple[float, str] | None = None

    def host_batch(self, rows: int, length: int) -> tuple[npt.NDArray[np.float32], Any]:
        """A (rows, length) float32 array to collate a batch into (not yet written), and what
        holds its memory, to pass to :meth:`launch`: page-locked memory on a GPU (any thread
        may call this once the encoder exists), so that the launch is one asynchronous copy.
        A batch over :data:`PINNED_BATCH_MAX_BYTES` gets pageable memory, which the launch
        copies: the queue of prefetched batches does not hold gigabytes page-locked."""
        if self.device.type != "cuda" or rows * length * 4 > PINNED_BATCH_MAX_BYTES:
            return np.empty((rows, length), dtype=np.float32), None
        torch.cuda.set_device(self.device)  # this thread's device: no second context
        held = torch.empty((rows, length), dtype=torch.float32, pin_memory=True)
        return held.numpy(), held

    def launch(
        self, batch: npt.NDArray[np.float32], frames: list[int], held: Any = None
    ) -> Pending:
        """Start encoding the rows of ``batch`` (B, L); ``collect`` returns the codes.

        Each row holds a clip right-padded with zeros to whole frames (and then to L);
        ``frames[i]`` is the clip's frame count, ``ceil(samples / 1920)``. Nothing here waits
        for the device: the copy in, the encoder and the copy of the codes back are queued
        behind the batch launched before. The encoder call is the one
        ``Qwen3TTSTokenizerV2Model.encode`` makes (the whole padded batch, then the first 16
        codebooks, then each clip's frames); the per-clip cut happens on the host, which saves
        a device sync per clip. ``held`` is the tensor :meth:`host_batch` returned with
        ``batch``: it goes to the device as it is (torch's pinned-memory allocator then keeps it
        from reuse until the copy is done); otherwise ``batch`` is copied into pinned memory.
        """
        b, longest = batch.shape
        if longest % self.frame or len(frames) != b:
            raise ValueError("batch rows must be right-padded to whole frames, one count a row")
        if self.device.type == "cuda":
            host = held
            if host is None:
                host = torch.empty(batch.shape, dtype=torch.float32, pin_memory=True)
                host.numpy()[...] = batch
            x = host.to(self.device, non_blocking=True)
        else:
            x = torch.from_numpy(batch)
        return self.launch_tensor(x, frames)

    def launch_tensor(self, x: torch.Tensor, frames: list[int]) -> Pending:
        """``launch`` for a (B, L) float32 batch already on the encoder's device."""
        with torch.inference_mode():
            enc = self.model.encoder.encode(
                input_values=x.to(self.dtype).unsqueeze(1),
                num_quantizers=self.num_quantizers,
                return_dict=True,
            )
            codes = enc.audio_codes[:, : self.num_quantizers]  # (B, 16, T)
            if self.device.type == "cuda":
                host = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
                host.copy_(codes, non_blocking=True)
                done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                done.record()  # type: ignore[no-untyped-call]
                return Pending(host, frames, done)
            return Pending(codes, frames, None)

    def collect(self, pending: Pending) -> list[Codes]:
        """Wait for a launched batch and return (frames[i], 16) codes for each of its rows."""
        if pending.done is not None:
            pending.done.synchronize()
        arr = pending.codes.numpy()
        return [arr[i, :, :f].T for i, f in enumerate(pending.frames)]

    def warm_up(self) -> None:
        """Encode a short batch once: loading cuDNN, cuBLAS and the kernels is start-up work,
        not the first real batch's."""
        self.encode(np.zeros((2, 25 * self.frame), dtype=np.float32), [25, 25])

    def encode(self, batch: npt.NDArray[np.float32], frames: list[int]) -> list[Codes]:
        """``launch`` then ``collect``: the codes of one batch."""
        return self.collect(self.launch(batch, frames))

    # -- memory --------------------------------------------------------------------------------
    def memory(self) -> GpuMemory | None:
        """Peak memory so far, or None on CPU."""
        if self.device.type != "cuda":
            return None
        if self._context is None:
            self._context = nonallocator_gib(self.device)
        ctx, src = self._context
        return GpuMemory(
            torch.cuda.max_memory_allocated(self.device) / GIB,
            torch.cuda.max_memory_reserved(self.device) / GIB,
            ctx,
            src,
        )

    def remeasure_context(self) -> None:
        """Measure the context again (after the first batch has loaded cuDNN and cuBLAS)."""
        if self.device.type == "cuda":
            self._context = nonallocator_gib(self.device)


def keep_shape_buffers_on_host(module: torch.nn.Module) -> None:
    """Move 0-d integer buffers (convolution shape bookkeeping) back to the CPU.

    The encoder's causal convolutions compute their padding from ``stride``, ``kernel_size`` and
    ``padding_total`` buffers and hand the result to ``F.pad`` as Python ints. With the buffers
    on the GPU, each of those reads is a device synchronisation; on the CPU it is a few
    microseconds of scalar arithmetic with the same values.
    """
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if (
                buf is not None
                and buf.dim() == 0
                and not buf.is_floating_point()
                and buf.device.type != "cpu"
            ):
                sub._buffers[name] = buf.cpu()


def pad_inside_convolutions(module: torch.nn.Module) -> int:
    """Let each causal, zero-padded ``MimiConv1d`` in ``module`` pad inside its convolution;
    return how many were changed.

    ``MimiConv1d`` pads its input on the left by ``padding_total`` (and on the right by what
    whole output frames need) with ``F.pad``, a new tensor written in two passes, then
    convolves it. The convolution's own zero padding of ``padding_total`` on both sides gives
    the same windows over the same values for every output the padded copy gives, and as many
    more on the right, which are cut off; where the right needs more than that, or for a
    padding cache (streaming), the original forward runs. A convolution that pads nothing
    (``F.pad`` would still copy) convolves its input as it is. The forward is bound to each
    module as a method, so a copy of the module runs its own weights.
    """
    from transformers.models.mimi.modeling_mimi import MimiConv1d

    changed = 0
    for sub in module.modules():
        if isinstance(sub, MimiConv1d) and sub.causal and sub.pad_mode == "constant":
            vars(sub)["_right_padding"] = {}  # input length → right padding, as computed
            sub.forward = types.MethodType(_forward_padded_inside, sub)  # type: ignore[method-assign]
            changed += 1
    return changed


def _forward_padded_inside(
    self: Any, hidden_states: torch.Tensor, padding_cache: Any = None
) -> torch.Tensor:
    length = int(hidden_states.shape[-1])
    extra = self._right_padding.get(length)
    if extra is None:
        extra = self._right_padding[length] = int(self._get_extra_padding_for_conv1d(hidden_states))
    left = int(self.padding_total)
    if padding_cache is not None or extra > left:
        return type(self).forward(self, hidden_states, padding_cache)  # type: ignore[no-any-return]
    conv = self.conv
    if left == 0 and extra == 0:
        return conv(hidden_states)  # type: ignore[no-any-return]
    out = (length + left + extra - int(self.kernel_size)) // conv.stride[0] + 1
    y = torch.nn.functional.conv1d(
        hidden_states, conv.weight, conv.bias, conv.stride, left, conv.dilation, conv.groups
    )
    return y[..., :out]


_plain_causal = threading.local()


def build_causal_masks_directly(transformer: torch.nn.Module) -> bool:
    """Let ``transformer`` (a ``MimiTransformerModel`` with SDPA attention) build its attention
    mask with one operation when it is called as the encoder calls it; return whether it does.

    Called with no attention mask, cache, positions or cache positions, the transformer asks
    transformers' ``create_causal_mask`` for a (batch, 1, length, length) boolean mask that is
    causal and, for positions ``0 … length - 1``, nothing else (the packed-sequence test it adds
    finds one sequence). transformers builds it element by element through ``vmap``, a fifth of
    the host's time per batch; here it is the lower triangle, the same tensor (a test compares
    them). Only for SDPA attention, which takes a boolean mask: the eager implementation adds
    the mask to the scores, and flash attention takes none. Other calls, and any other model in
    the process, keep transformers' function.
    """
    from transformers.models.mimi import modeling_mimi

    config = transformer.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(
        config, "use_cache", False
    ):
        return False
    if not getattr(getattr(modeling_mimi, "create_causal_mask"), "_gpuspool", False):  # noqa: B009
        original = getattr(modeling_mimi, "create_causal_mask")  # noqa: B009

        def create_causal_mask(*args: Any, **kwargs: Any) -> Any:
            embeds = kwargs.get("input_embeds")
            config = kwargs.get("config")
            if (
                not getattr(_plain_causal, "on", False)
                or args
                or embeds is None
                or getattr(config, "_attn_implementation", None) != "sdpa"
                or kwargs.get("attention_mask") is not None
                or kwargs.get("past_key_values") is not None
            ):
                return original(*args, **kwargs)
            b, n = int(embeds.shape[0]), int(embeds.shape[1])
            tril = torch.ones((n, n), dtype=torch.bool, device=embeds.device).tril_()
            return tril.expand(b, 1, n, n).contiguous()

        create_causal_mask._gpuspool = True  # type: ignore[attr-defined]
        setattr(modeling_mimi, "create_causal_mask", create_causal_mask)  # noqa: B010
    transformer.forward = types.MethodType(_forward_plain_causal, transformer)
    return True


def _forward_plain_causal(self: Any, hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
    plain = not args and not kwargs.get("use_cache")
    plain = plain and all(
        kwargs.get(k) is None
        for k in ("attention_mask", "position_ids", "past_key_values", "cache_position")
    )
    _plain_causal.on = plain
    try:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    finally:
        _plain_causal.on = False


def nonallocator_gib(device: torch.device) -> tuple[float, str]:
    """GPU memory this process holds outside torch's allocator (context, cuDNN, cuBLAS), GiB.

    Read from NVML's per-process usage minus torch's reserved memory; where NVML cannot see
    the process (some containers), the measured constant from :mod:`gpuspool.estimate`.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            handle = None
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                u = pynvml.nvmlDeviceGetUUID(h)
                u = u.decode() if isinstance(u, bytes) else str(u)
                if u.removeprefix("GPU-") == uuid.removeprefix("GPU-"):
                    handle = h
                    break
            if handle is not None:
                procs: list[Any] = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                for p in procs:
                    used = getattr(p, "usedGpuMemory", None)
                    if p.pid == os.getpid() and used:
                        reserved = torch.cuda.memory_reserved(device)
                        return max(0.0, (int(used) - reserved) / GIB), "nvml"
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    return CONTEXT_GIB, "constant"

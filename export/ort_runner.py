"""Running an exported model in ONNX Runtime: CUDA when onnxruntime-gpu can, else CPU with one notice."""
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from loldu.errors import ExportError
from loldu.spec import C_ABS_MAX

from .adapter_inputs import C_PREFIX, adapter_feeds

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OrtNotice(UserWarning):
    """OrtRunner fell back to CPUExecutionProvider (shown once per process and reason)."""


_NOTICES_SHOWN = set()  # the reasons already shown in this process


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(f"loldu.export.OrtRunner: onnxruntime is not installed ({e}); "
                          "pip install onnxruntime-gpu (it also runs on CPU)") from None
    return ort


class OrtRunner:
    """An ONNX Runtime session for an exported file.

    provider: "auto" (CUDAExecutionProvider if the installed onnxruntime-gpu can create it on this
    machine, else CPUExecutionProvider with one OrtNotice warning per process), "cuda" (ExportError if CUDA cannot
    be used) or "cpu". `run` takes numpy arrays or torch tensors; CUDA tensors on a CUDA session go
    through IO binding (no host copies) and come back as CUDA tensors, anything else as numpy arrays.
    Errors from ONNX Runtime (bad file, unknown provider, wrong input names, dtypes or shapes) are
    raised as loldu.ExportError naming the file and the input at fault.
    """

    def __init__(self, path, *, provider: str = "auto", threads: Optional[int] = None, quiet: bool = False):
        ort = _import_ort()
        self.path = str(path)
        if provider not in ("auto", "cuda", "cpu"):
            raise ExportError(f"loldu.export.OrtRunner: provider must be 'auto', 'cuda' or 'cpu', got {provider!r}")
        if not Path(self.path).is_file():
            raise ExportError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        self.notice: Optional[str] = None
        self.session = None
        if provider in ("auto", "cuda"):
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                reason = (f"the installed onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                          "(install onnxruntime-gpu)")
            else:
                self.session = self._create(ort, opts, ["CUDAExecutionProvider", "CPUExecutionProvider"], quiet=True)
                if self.session.get_providers()[0] != "CUDAExecutionProvider":
                    self.session = None
                    reason = ("CUDAExecutionProvider could not be created (no GPU, or the CUDA/cuDNN libraries "
                              f"onnxruntime-gpu {ort.__version__} needs are missing)")
            if self.session is None:
                if provider == "cuda":
                    raise ExportError(f"{self.path}: provider='cuda' but {reason}")
                self.notice = f"loldu.export.OrtRunner: running {Path(self.path).name} on CPUExecutionProvider: {reason}"
                if not quiet and reason not in _NOTICES_SHOWN:
                    _NOTICES_SHOWN.add(reason)
                    warnings.warn(f"{self.notice} (shown once)", OrtNotice, stacklevel=2)
        if self.session is None:
            self.session = self._create(ort, opts, ["CPUExecutionProvider"], quiet=False)
        self.provider = self.session.get_providers()[0]
        self.inputs = OrderedDict((i.name, i) for i in self.session.get_inputs())
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _create(self, ort, opts, providers, quiet):
        if quiet:  # a failed CUDA provider logs a screenful at ERROR level; the caller reports it in one line
            ort.set_default_logger_severity(4)
        try:
            return ort.InferenceSession(self.path, opts, providers=providers)
        except Exception as e:
            raise ExportError(f"{self.path}: onnxruntime could not load the model ({_short(e)})") from None
        finally:
            if quiet:
                ort.set_default_logger_severity(2)

    @property
    def input_names(self):
        return list(self.inputs)

    def __repr__(self) -> str:
        return f"OrtRunner({self.path!r}, provider={self.provider!r})"

    # -- checks -------------------------------------------------------------------------------------
    def _check(self, feeds: Mapping[str, object]) -> None:
        missing = [n for n in self.inputs if n not in feeds]
        unknown = [n for n in feeds if n not in self.inputs]
        if unknown or missing:
            msg = f"{self.path}: "
            if unknown:
                msg += f"unknown inputs {unknown[:4]}; "
            if missing:
                hint = " (the adapter's c vectors: see loldu.export.adapter_feeds)" if any(
                    n.startswith(C_PREFIX) for n in missing) else ""
                msg += f"missing inputs {missing[:4]}{' and %d more' % (len(missing) - 4) if len(missing) > 4 else ''}{hint}; "
            raise ExportError(msg + f"the model's inputs are {self._describe()}")
        for name, meta in self.inputs.items():
            v = feeds[name]
            shape, dtype = tuple(v.shape), v.dtype
            want = _ORT_TO_NUMPY.get(meta.type)
            got = _numpy_dtype(dtype)
            if want is not None and got != want:
                raise ExportError(f"{self.path}: input {name!r} must be {np.dtype(want).name} ({meta.type}), got {dtype}")
            if len(shape) != len(meta.shape) or any(isinstance(d, int) and d != s for d, s in zip(meta.shape, shape)):
                raise ExportError(f"{self.path}: input {name!r} has shape {list(shape)} but the model expects "
                                  f"{_fmt_shape(meta.shape)}")
            if name.startswith(C_PREFIX):
                _check_c(self.path, name, v)

    def _describe(self) -> str:
        items = [f"{n} {_fmt_shape(m.shape)} {m.type}" for n, m in self.inputs.items() if not n.startswith(C_PREFIX)]
        nc = sum(n.startswith(C_PREFIX) for n in self.inputs)
        return "; ".join(items) + (f" and {nc} adapter inputs loldu.c.*" if nc else "")

    # -- running ------------------------------------------------------------------------------------
    def run(self, feeds: Union[Mapping[str, object], Sequence[object]], adapter=None) -> Dict[str, object]:
        """{output name: array}. feeds: {input name: array or tensor}, or a list/tuple in input order.

        adapter: for an export with adapter inputs, a dict of c feeds, a model with LoLDU layers, or an
        adapter directory (see loldu.export.adapter_feeds); merged into feeds.
        """
        if not isinstance(feeds, (Mapping, list, tuple)):
            raise ExportError(f"{self.path}: run() takes a dict {{input name: numpy array or torch tensor}} or a "
                              f"list/tuple of them in input order, got {type(feeds).__name__}; the model's inputs "
                              f"are {self._describe()}")
        if not isinstance(feeds, Mapping):
            names = [n for n in self.inputs if not n.startswith(C_PREFIX)]
            if len(feeds) == len(self.inputs):
                names = list(self.inputs)
            if len(feeds) != len(names):
                raise ExportError(f"{self.path}: got {len(feeds)} positional inputs; the model's inputs are {self._describe()}")
            feeds = dict(zip(names, feeds))
        else:
            feeds = dict(feeds)
        if adapter is not None:
            if not isinstance(adapter, Mapping):
                adapter = adapter_feeds(adapter, self)
            feeds.update(adapter)
        for name, v in feeds.items():
            if not isinstance(v, (np.ndarray, np.generic, torch.Tensor)):
                raise ExportError(f"{self.path}: input {name!r} must be a numpy array or a torch tensor, "
                                  f"got {type(v).__name__}")
        self._check(feeds)
        on_device = self.provider == "CUDAExecutionProvider" and any(
            isinstance(v, torch.Tensor) and v.is_cuda for v in feeds.values())
        try:
            if on_device:
                return self._run_bound(feeds)
            arrays = {n: _to_numpy(v) for n, v in feeds.items()}
            outs = self.session.run(self.output_names, arrays)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"{self.path}: onnxruntime failed ({_short(e)})") from None
        return OrderedDict(zip(self.output_names, outs))

    def _run_bound(self, feeds):
        """IO binding: CUDA tensors are read in place and outputs stay on the GPU."""
        binding = self.session.io_binding()
        keep = []
        device = next(v.device for v in feeds.values() if isinstance(v, torch.Tensor) and v.is_cuda)
        for name, v in feeds.items():
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
            t = t.to(device).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", device.index or 0, _numpy_dtype(t.dtype), list(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", device.index or 0)
        torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)
        outs = OrderedDict()
        for name, ov in zip(self.output_names, binding.get_outputs()):
            try:
                outs[name] = torch.utils.dlpack.from_dlpack(ov._get_c_value().to_dlpack())
            except AttributeError:  # an onnxruntime without DLPack: one copy through the host
                outs[name] = torch.from_numpy(ov.numpy()).to(device)
        return outs


def _check_c(path: str, name: str, v) -> None:
    """An adapter's c feed must be finite and within the adapter spec's bound (loldu.spec.C_ABS_MAX):
    an Inf there would make every output NaN without a word."""
    c = v.detach().cpu().double() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, np.float64))
    bad = ~torch.isfinite(c) | (c.abs() > C_ABS_MAX)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise ExportError(f"{path}: input {name!r} holds c = {float(c.reshape(-1)[i]):.4g} at index {i}: an adapter's "
                          f"coefficients must be finite and at most {C_ABS_MAX:g} in magnitude (the adapter diverged)")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _numpy_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).numpy().dtype.type if dtype != torch.bfloat16 else None
    return np.dtype(dtype).type


def _to_numpy(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(v)

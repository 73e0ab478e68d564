"""Running an exported model in ONNX Runtime: CUDA when onnxruntime-gpu can, else CPU with one notice;
adapters switched per run through ONNX Runtime's own adapter API (export/ort_adapter.py)."""
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from loldu.errors import ExportError
from loldu.spec import C_ABS_MAX

from .adapter_inputs import C_PREFIX, adapter_feeds, adapter_metadata, model_version
from .ort_adapter import CInputs, adapter_params, check_ort_adapter, write_params

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

    Adapters (an export with adapter_inputs=True): `run(feeds, adapter=...)` takes an adapter directory
    (loldu.save_adapter) or an .onnx_adapter file (loldu.export.to_ort_adapter), checked against the
    model once, loaded once as an onnxruntime.LoraAdapter and kept (the `max_adapters` most recently
    used), and made active for that run only (RunOptions.add_active_adapter): other runs, concurrent
    ones included, are not affected. Without an adapter the c inputs keep their defaults (zeros: the
    base model). A dict of c feeds or a model with LoLDU layers is fed as inputs instead.
    ONNX Runtime's warnings are not shown (errors are raised): it warns once per c input that an
    initializer which is also an input cannot be constant-folded, which is what makes it overridable.
    """

    def __init__(self, path, *, provider: str = "auto", threads: Optional[int] = None, quiet: bool = False,
                 max_adapters: int = 1024):
        ort = _import_ort()
        self.path = str(path)
        if provider not in ("auto", "cuda", "cpu"):
            raise ExportError(f"loldu.export.OrtRunner: provider must be 'auto', 'cuda' or 'cpu', got {provider!r}")
        if not isinstance(max_adapters, int) or max_adapters < 1:
            raise ExportError(f"loldu.export.OrtRunner: max_adapters must be a positive int, got {max_adapters!r}")
        if not Path(self.path).is_file():
            raise ExportError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
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
        self.required = set(self.inputs)
        for i in self.session.get_overridable_initializers():
            if i.name.startswith(C_PREFIX):  # an adapter's input with a default: optional
                self.inputs[i.name] = i
        self.c_inputs: CInputs = OrderedDict(
            (n, (_ORT_TO_NUMPY.get(m.type, np.float32), tuple(m.shape), n not in self.required))
            for n, m in self.inputs.items() if n.startswith(C_PREFIX))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_adapters = max_adapters
        self.adapter_loads = 0  # adapters loaded (not served from the cache) so far
        # key -> (LoraAdapter, RunOptions with it active): the options refer to the adapter without owning it
        self._adapters: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._lock = threading.Lock()
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._model_version: Optional[int] = None

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
        missing = [n for n in self.inputs if n not in feeds and n in self.required]
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
            if name not in feeds:
                continue
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

        adapter: for an export with adapter inputs, an adapter directory or an .onnx_adapter file
        (ONNX Runtime's adapter, active for this run; see the class), or a dict of c feeds or a model
        with LoLDU layers (see loldu.export.adapter_feeds), merged into feeds.
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
        options = None
        if isinstance(adapter, (str, os.PathLike)):
            options = self.adapter_options(adapter)
            if options is None:  # c inputs without defaults (an older export): fed as inputs
                adapter = adapter_feeds(adapter, self)
            else:
                fed = [n for n in feeds if n.startswith(C_PREFIX)]
                if fed:
                    raise ExportError(f"{self.path}: adapter {adapter} and c feeds {fed[:2]} in one run: "
                                      "give one or the other")
                adapter = None
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
                return self._run_bound(feeds, options)
            arrays = {n: _to_numpy(v) for n, v in feeds.items()}
            outs = self.session.run(self.output_names, arrays, options)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"{self.path}: onnxruntime failed ({_short(e)})") from None
        return OrderedDict(zip(self.output_names, outs))

    def _run_bound(self, feeds, options=None):
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
        self.session.run_with_iobinding(binding, options)
        outs = OrderedDict()
        for name, ov in zip(self.output_names, binding.get_outputs()):
            try:
                outs[name] = torch.utils.dlpack.from_dlpack(ov._get_c_value().to_dlpack())
            except AttributeError:  # an onnxruntime without DLPack: one copy through the host
                outs[name] = torch.from_numpy(ov.numpy()).to(device)
        return outs


    # -- adapters ------------------------------------------------------------------------------------
    @property
    def cached_adapters(self) -> int:
        return len(self._adapters)

    def adapter_options(self, adapter) -> Optional[object]:
        """The onnxruntime.RunOptions with adapter `adapter` (a LoLDU adapter directory or an .onnx_adapter
        file) active, loaded and checked on first use, then from the cache (keyed by the path and its
        files' sizes and modification times, so a rewritten adapter is read again). None for a
        directory when the model's c inputs have no defaults (fed as inputs instead)."""
        p = Path(adapter)
        if p.is_dir():
            if not self.c_inputs or not all(has for _, _, has in self.c_inputs.values()):
                return None
            stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(p.iterdir()) if f.is_file())
        elif p.is_file():
            if not self.c_inputs or not all(has for _, _, has in self.c_inputs.values()):
                raise ExportError(f"adapter file {adapter} for model {self.path}: the model's c inputs have no default "
                                  "values, so ONNX Runtime cannot override them with an adapter (exported without "
                                  "adapter_inputs=True, or by an older loldu): export it again")
            st = p.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        else:
            raise ExportError(f"{self.path}: adapter {adapter}: no such adapter directory or .onnx_adapter file")
        key = (str(p.resolve()), stamp)
        with self._lock:
            hit = self._adapters.get(key)
            if hit is not None:
                self._adapters.move_to_end(key)
                return hit[1]
        loaded = self._load_adapter(p)
        with self._lock:
            self._adapters[key] = loaded
            while len(self._adapters) > self.max_adapters:
                self._adapters.popitem(last=False)
        return loaded[1]

    def _load_adapter(self, p: Path):
        ort = _import_ort()
        if p.is_dir():  # written as an .onnx_adapter once, then memory-mapped by LoraAdapter.Load
            params, version, _ = adapter_params(p, self)
            with self._lock:
                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="loldu-ort-adapters-")
            fd, tmp = tempfile.mkstemp(suffix=".onnx_adapter", dir=self._tmp.name)
            os.close(fd)
            try:
                write_params(params, version, tmp)
                lora = self._lora(ort, tmp, p)
            finally:
                os.unlink(tmp)  # the mapping stays valid
        else:
            check_ort_adapter(p, self.model_version(p), self.c_inputs, self.path)
            lora = self._lora(ort, str(p), p)
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        self.adapter_loads += 1
        return lora, options

    def _lora(self, ort, path: str, label: Path):
        lora = ort.LoraAdapter()
        try:
            lora.Load(path)
        except RuntimeError as e:
            raise ExportError(f"adapter {label} for model {self.path}: onnxruntime could not load it "
                              f"({_short(e)})") from None
        return lora

    def model_version(self, adapter=None) -> int:
        """The model version an .onnx_adapter for this model carries (loldu.export.to_ort_adapter)."""
        if self._model_version is None:
            try:
                self._model_version = model_version(adapter_metadata(self))
            except ExportError as e:
                raise ExportError(f"adapter {adapter} for model {self.path}: the model has no c inputs ({e})") from None
        return self._model_version


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

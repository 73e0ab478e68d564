// Merge, unmerge and swap of adapter files over weight maps (see loldu/merge.h), and safetensors
// files <-> weight maps. Mirrors python/loldu/layer.py (merge, unmerge, _add_to_weight,
// coefficients) and python/loldu/adapter_io.py (fingerprint, the load-time checks).
#include <loldu/merge.h>

#include <loldu/loldu.h>
#include <loldu/safetensors.h>
#include <loldu/sha256.h>
#include <loldu/spec.h>

#include "ldu_common.h"  // working_dtype

#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <set>

namespace loldu {
namespace {

struct DtypeName {
  const char* safetensors;
  at::ScalarType type;
  const char* name;  // torch's, without "torch.": "float32"
};

// spec::kDtypes with the torch type of each row.
const std::vector<DtypeName>& dtype_table() {
  static const std::vector<DtypeName> table = [] {
    const at::ScalarType types[] = {
#define LOLDU_C10_TYPE(name) at::ScalarType::name,
        LOLDU_SPEC_C10_TYPES(LOLDU_C10_TYPE)
#undef LOLDU_C10_TYPE
    };
    static_assert(std::size(types) == std::size(spec::kDtypes), "LOLDU_SPEC_C10_TYPES lists one type per kDtypes row");
    std::vector<DtypeName> out;
    for (size_t i = 0; i < std::size(types); ++i)
      out.push_back({spec::kDtypes[i].safetensors, types[i], spec::kDtypes[i].torch});
    return out;
  }();
  return table;
}

const DtypeName* by_safetensors(const std::string& name) {
  for (const auto& d : dtype_table())
    if (name == d.safetensors) return &d;
  return nullptr;
}

const DtypeName* by_type(at::ScalarType t) {
  for (const auto& d : dtype_table())
    if (t == d.type) return &d;
  return nullptr;
}

// "float32" for at::kFloat: the layer dtype names of adapter files.
std::string short_dtype(at::ScalarType t) {
  const DtypeName* d = by_type(t);
  return d ? std::string(d->name) : std::string(c10::toString(t));
}

std::string shape_str(at::IntArrayRef s) { return tuple_repr(s.vec()); }

std::string number_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

at::Tensor from_bytes(const std::string& dtype, const std::vector<int64_t>& shape, const uint8_t* data, size_t nbytes,
                      const std::string& where) {
  const DtypeName* d = by_safetensors(dtype);
  if (!d) throw AdapterError(where + ": dtype " + dtype + " has no torch counterpart");
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(d->type));
  if (size_t(t.nbytes()) != nbytes) throw AdapterError(where + ": " + std::to_string(nbytes) + " bytes do not fit " + dtype + " " + shape_str(shape));
  if (nbytes) std::memcpy(t.data_ptr(), data, nbytes);
  return t;
}

// Python's loldu.layer.holds: factors whose largest magnitude is `peak` may be stored in `t`.
bool holds(at::ScalarType t, double peak) {
  double max = std::numeric_limits<double>::max();
  if (t == at::kHalf) max = 65504.0;
  else if (t == at::kBFloat16) max = 3.3895313892515355e38;
  else if (t == at::kFloat) max = double(std::numeric_limits<float>::max());
  return peak <= max / 256.0;
}

at::ScalarType factor_dtype(const std::optional<std::string>& name, at::ScalarType weight) {
  if (!name) return weight;
  for (const auto& d : dtype_table())
    if (*name == d.name) return d.type;
  throw AdapterError("loldu: factor_dtype '" + *name + "' is not a dtype");  // the reader allows none such
}

std::string where_of(const AdapterFile& a) {
  return a.source.empty() ? "adapter '" + a.adapter_name + "'" : a.source;
}

at::Tensor as_layout(const at::Tensor& M, const at::Tensor& weight, const std::string& kind) {
  if (kind == "conv2d") return M.reshape(weight.sizes());
  if (kind == "conv1d") return M.t();
  return M;
}

// Where a plan reads the base weights: the map itself, or staged values overriding it.
using FingerprintCache = std::vector<std::pair<std::vector<int32_t>, std::array<uint8_t, 32>>>;

struct BaseView {
  const WeightMap& weights;
  std::map<std::string, at::Tensor> staged;  // key -> value (undefined: the key is absent)
  std::set<std::string> owned;               // staged values no map tensor aliases (pristine copies)
  std::map<std::string, FingerprintCache> checked;  // fingerprints already computed of owned values
  const at::Tensor* find(const std::string& key) const {
    auto s = staged.find(key);
    if (s != staged.end()) return s->second.defined() ? &s->second : nullptr;
    auto w = weights.find(key);
    return w == weights.end() ? nullptr : &w->second;
  }
};

struct LayerCheck {
  std::string key, kind;
  at::Tensor weight, W, pivots;
  std::vector<int32_t> pivot_list;
  std::array<uint8_t, 32> fp;
};

// An AdapterFile may be built or edited in C++: its arrays must fit its layers and rank before any
// of them is read (the reader checks files the same way).
void check_contents(const AdapterFile& a, const std::string& where) {
  const int64_t L = int64_t(a.layers.size());
  if (L == 0 || a.rank() < 0) throw AdapterError(where + ": the adapter has no layers or a negative rank");
  for (size_t i = 0; i < a.layers.size(); ++i)
    if (a.layer_rank(i) < 1)
      throw AdapterError(where + ": layer '" + a.layers[i].name + "': rank below 1");
  const std::vector<size_t> off = a.offsets();
  if (a.z.size() != off.back() || int64_t(a.sigma.size()) != L || a.pivots.size() != off.back() ||
      int64_t(a.fingerprints.size()) != L)
    throw AdapterError(where + ": z, sigma, pivots and fingerprints do not hold one entry per layer (" +
                       std::to_string(L) + " layers, ranks summing to " + std::to_string(off.back()) + ")");
  const spec::TensorSpec& zs = spec::kTensors[0];  // z: the dtypes its values may be stored in
  if (a.z_dtype != zs.dtypes[0] && a.z_dtype != zs.dtypes[1])
    throw AdapterError(where + ": z_dtype must be " + zs.dtypes[0] + " or " + zs.dtypes[1] + ", got '" + a.z_dtype + "'");
  check_coefficient_inputs(a, where);
  for (size_t i = 0; i < a.layers.size(); ++i) {
    std::vector<int32_t> p(a.pivots.begin() + int64_t(off[i]), a.pivots.begin() + int64_t(off[i + 1]));
    std::sort(p.begin(), p.end());
    if (p.front() < 0 || int64_t(p.back()) >= a.layers[i].d || std::adjacent_find(p.begin(), p.end()) != p.end())
      throw AdapterError(where + ": layer '" + a.layers[i].name + "': pivots must be " + std::to_string(p.size()) +
                         " distinct rows in [0, " + std::to_string(a.layers[i].d) + ")");
  }
  for (const auto& kv : a.saved_tensors) {
    const size_t esize = safetensors_dtype_size(kv.second.dtype);
    int64_t n = 1;
    for (int64_t d : kv.second.shape) n = d < 0 ? -1 : n * d;
    if (kv.first.rfind(spec::kSavedPrefix, 0) != 0 || esize == 0 || n < 0 || size_t(n) * esize != kv.second.bytes.size())
      throw AdapterError(where + ": saved tensor '" + kv.first + "': its name, dtype, shape and bytes do not agree");
  }
}

std::vector<LayerCheck> check_layers(const BaseView& view, const AdapterFile& a) {
  const std::string where = where_of(a);
  check_contents(a, where);
  const std::vector<size_t> off = a.offsets();
  std::vector<LayerCheck> out;
  std::set<std::string> keys;
  for (size_t i = 0; i < a.layers.size(); ++i) {
    const AdapterLayer& l = a.layers[i];
    const std::string layer = where + ": layer '" + l.name + "'";
    const std::string key = l.name + ".weight";
    const at::Tensor* t = view.find(key);
    if (!t) {
      // The adapter's names under a prefix the weights lack (a task model's 'bert.' over its bare encoder's
      // file), or the other way round: say so, as Python's loader does.
      std::string hint;
      const size_t dot = l.name.find('.');
      if (dot != std::string::npos && view.find(l.name.substr(dot + 1) + ".weight"))
        hint = "; the weights name it '" + l.name.substr(dot + 1) + ".weight': the adapter was trained on a model whose "
               "module names carry the prefix '" + l.name.substr(0, dot + 1) + "' (a task model over this base), so "
               "merge it into that model's weights";
      throw AdapterError(layer + " is in the adapter but the weights have no '" + key + "'" + hint);
    }
    if (std::none_of(std::begin(spec::kLayerKinds), std::end(spec::kLayerKinds), [&](const char* k) { return l.kind == k; })) {
      std::string kinds;
      for (const char* k : spec::kLayerKinds) kinds += std::string(kinds.empty() ? "" : ", ") + k;
      throw AdapterError(layer + ": unknown kind '" + l.kind + "' (" + kinds + ")");
    }
    const int64_t want_dim = l.kind == "conv2d" ? 4 : 2;
    if (t->dim() != want_dim)
      throw AdapterError(layer + " is a " + l.kind + " layer in the file, but '" + key + "' has shape " +
                         shape_str(t->sizes()) + " (" + std::to_string(want_dim) + " dimensions expected)");
    const at::ScalarType st = t->scalar_type();
    if (st != at::kFloat && st != at::kDouble && st != at::kHalf && st != at::kBFloat16)
      throw AdapterError(layer + ": '" + key + "' is " + short_dtype(st) + ", not a floating-point weight");
    at::Tensor W = weight_matrix(*t, l.kind);
    if (W.size(0) != l.d || W.size(1) != l.k)
      throw AdapterError(layer + " has weight " + shape_str(W.sizes()) + " in the weights but " +
                         shape_str({l.d, l.k}) + " in the file");
    const int64_t r = int64_t(off[i + 1] - off[i]);
    if (r > std::min(l.d, l.k))
      throw AdapterError(layer + ": rank " + std::to_string(r) + " exceeds the smaller side of its " +
                         shape_str({l.d, l.k}) + " weight");
    if (short_dtype(st) != l.dtype)
      throw AdapterError(layer + " has weight dtype torch." + short_dtype(st) + " in the weights but " + l.dtype +
                         " in the file");
    at::Tensor piv = at::from_blob(const_cast<int32_t*>(a.pivots.data()) + off[i], {r}, at::kInt).to(at::kLong);
    std::vector<int32_t> pivot_list(a.pivots.begin() + int64_t(off[i]), a.pivots.begin() + int64_t(off[i + 1]));
    // A pristine copy kept by a merge record is never written: its fingerprints are remembered.
    const std::array<uint8_t, 32>* known = nullptr;
    auto cache = view.checked.find(key);
    if (cache != view.checked.end())
      for (const auto& e : cache->second)
        if (e.first == pivot_list) known = &e.second;
    const std::array<uint8_t, 32> fp = known ? *known : fingerprint(W, piv);
    if (fp != a.fingerprints[i])
      throw AdapterError(layer + ": the base weight's fingerprint differs from the one the adapter was trained on "
                         "(a different base model or checkpoint)");
    keys.insert(key);
    out.push_back({key, l.kind, *t, W, piv, std::move(pivot_list), fp});
  }
  for (const auto& kv : a.saved_tensors) {
    const std::string target = kv.first.substr(std::strlen(spec::kSavedPrefix));  // "saved.<m>.<t>" -> "<m>.<t>"
    if (keys.count(target))
      throw AdapterError(where + ": saved tensor '" + kv.first + "' would replace the adapted weight '" + target + "'");
    const at::Tensor* t = view.find(target);
    const DtypeName* d = by_safetensors(kv.second.dtype);
    if (!d) throw AdapterError(where + ": saved tensor '" + kv.first + "' has dtype " + kv.second.dtype + ", which torch lacks");
    if (t && (t->sizes() != at::IntArrayRef(kv.second.shape) || t->scalar_type() != d->type))
      throw AdapterError(where + ": saved tensor '" + kv.first + "' is " + kv.second.dtype + " " +
                         shape_str(kv.second.shape) + " but the weights' '" + target + "' is " +
                         short_dtype(t->scalar_type()) + " " + shape_str(t->sizes()));
  }
  return out;
}

// The staged writes of a merge of `a` onto `view`, and its record.
struct Plan {
  std::map<std::string, at::Tensor> writes;  // key -> new value (undefined: erase the key)
  MergeRecord record;
};

Plan plan_merge(const BaseView& view, const AdapterFile& a, bool keep_base) {
  const std::string where = where_of(a);
  std::vector<LayerCheck> layers = check_layers(view, a);  // every layer before any computation
  Plan plan;
  plan.record.adapter_name = a.adapter_name;
  plan.record.source = a.source;
  plan.record.keep_base = keep_base;
  plan.record.active = true;
  const std::vector<size_t> off = a.offsets();
  c10::NoGradGuard no_grad;
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerCheck& l = layers[i];
    const int64_t r = int64_t(off[i + 1] - off[i]);
    const double s0 = double(a.config.scale_for(a.layers[i].name, r));  // alpha / r of this layer, fp32-rounded
    LduResult f;
    try {
      f = ldu_from_pivots(l.W, l.pivots);
    } catch (const c10::Error& e) {
      throw AdapterError(where + ": layer '" + a.layers[i].name + "': the base weight cannot be factorized (" +
                         e.what_without_backtrace() + ")");
    }
    // Storage of PL and U as the Python layer keeps them (factor_dtype, else the weight's dtype;
    // fp32 when that dtype cannot hold them); "cur" storage forms them in the working dtype.
    at::Tensor PL = f.PL, U = f.U;
    if (a.config.factor_storage == "full") {
      at::ScalarType fd = factor_dtype(a.config.factor_dtype, l.W.scalar_type());
      const double peak = std::max(f.PL.abs().max().item<double>(), f.U.abs().max().item<double>());
      if (!holds(fd, peak)) fd = at::kFloat;
      PL = f.PL.to(fd).contiguous();
      U = f.U.to(fd).contiguous();
    }
    const at::ScalarType wt = working_dtype(f.D.scalar_type());
    // z and sigma (F32 or F64 in the file) in the working dtype, as the Python layer holds them.
    at::Tensor z = at::from_blob(const_cast<double*>(a.z.data()) + off[i], {r}, at::kDouble).to(wt);
    at::Tensor sigma = at::scalar_tensor(a.sigma[i], at::kDouble).to(wt);
    at::Tensor D = f.D.to(wt);
    at::Tensor c = coefficients(z, sigma, D, s0, a.config.parametrization);
    const std::string layer = where + ": layer '" + a.layers[i].name + "'";
    // adapter_spec.json's c_check: c finite and within kCAbsMax in the working dtype, the merged weight finite.
    if (!at::isfinite(c).all().item<bool>() || c.abs().max().item<double>() > spec::kCAbsMax)
      throw AdapterError(layer + ": its coefficients c (max |c| " + number_text(c.abs().max().item<double>()) + " in " +
                         short_dtype(wt) + ") are not finite or exceed the bound " + number_text(spec::kCAbsMax) +
                         "; nothing was merged");
    at::Tensor delta = delta_weight(PL, U, a.config.factor_storage == "full" ? c : c.to(PL.scalar_type()));
    // W + delta in delta's dtype (Python: W.to(delta.dtype) + delta), summed into delta's own buffer.
    at::Tensor merged = delta.add_(l.W.to(delta.scalar_type())).to(l.W.scalar_type());
    if (!at::isfinite(merged).all().item<bool>())
      throw AdapterError(layer + ": the merged weight holds NaN/Inf in " + short_dtype(merged.scalar_type()) +
                         "; nothing was merged");
    plan.writes[l.key] = as_layout(merged, l.weight, l.kind);
    MergeRecord::Layer rec{l.key, l.kind, l.pivots, PL, U, c,
                           l.W.narrow(1, 0, r).clone(), l.W.index_select(0, l.pivots), at::Tensor()};
    if (keep_base) {
      const bool owned = view.owned.count(l.key) > 0;
      rec.base = owned ? l.weight : l.weight.clone();
      auto cache = view.checked.find(l.key);
      if (owned && cache != view.checked.end()) rec.checked = cache->second;
      bool present = false;
      for (const auto& e : rec.checked) present |= e.first == l.pivot_list;
      if (!present) rec.checked.emplace_back(l.pivot_list, l.fp);
    }
    plan.record.layers.push_back(std::move(rec));
  }
  for (const auto& kv : a.saved_tensors) {
    const std::string target = kv.first.substr(std::strlen(spec::kSavedPrefix));
    const at::Tensor* t = view.find(target);
    MergeRecord::Saved rec{target, at::Tensor()};
    if (t) rec.original = view.owned.count(target) ? *t : t->clone();
    plan.record.saved.push_back(rec);
    plan.writes[target] = from_bytes(kv.second.dtype, kv.second.shape, kv.second.bytes.data(), kv.second.bytes.size(),
                                     where + ": saved tensor '" + kv.first + "'");
  }
  return plan;
}

// The values that unmerging `rec` gives back (undefined: the key was absent before the merge).
std::map<std::string, at::Tensor> plan_unmerge(const WeightMap& weights, const MergeRecord& rec, std::set<std::string>& owned,
                                              std::map<std::string, FingerprintCache>* checked = nullptr) {
  const std::string where = rec.source.empty() ? "adapter '" + rec.adapter_name + "'" : rec.source;
  if (!rec.active) throw AdapterError(where + ": this merge record was already unmerged or swapped");
  std::map<std::string, at::Tensor> out;
  c10::NoGradGuard no_grad;
  for (const auto& l : rec.layers) {
    auto it = weights.find(l.key);
    const at::Tensor* base = l.base.defined() ? &l.base : nullptr;
    if (it == weights.end() || it->second.sizes() != (base ? base->sizes() : it->second.sizes()) ||
        (base && it->second.scalar_type() != base->scalar_type()))
      throw AdapterError(where + ": cannot unmerge: the weights' '" + l.key + "' is missing or was replaced since the merge");
    if (base) {
      out[l.key] = *base;
      owned.insert(l.key);
      if (checked) (*checked)[l.key] = l.checked;
      continue;
    }
    const at::Tensor& w = it->second;
    at::Tensor W = weight_matrix(w, l.kind);
    at::Tensor delta = delta_weight(l.PL, l.U, l.c.scalar_type() == l.PL.scalar_type() ? l.c : l.c.to(l.PL.scalar_type()));
    at::Tensor M = (W.to(delta.scalar_type()) - delta).to(W.scalar_type());
    M.narrow(1, 0, l.cols.size(1)).copy_(l.cols);
    M.index_copy_(0, l.pivots, l.rows);
    out[l.key] = as_layout(M, w, l.kind);
    owned.insert(l.key);
  }
  for (const auto& s : rec.saved) {
    out[s.key] = s.original;
    owned.insert(s.key);
  }
  return out;
}

// Writes the staged values into `weights`: in place into existing tensors, inserting new keys,
// erasing keys staged undefined. Every value was checked before; nothing here can fail but memory.
void commit(WeightMap& weights, const std::map<std::string, at::Tensor>& writes) {
  c10::NoGradGuard no_grad;
  for (const auto& kv : writes) {
    auto it = weights.find(kv.first);
    if (!kv.second.defined()) {
      if (it != weights.end()) weights.erase(it);
    } else if (it != weights.end() && it->second.sizes() == kv.second.sizes() &&
               it->second.scalar_type() == kv.second.scalar_type()) {
      if (!it->second.is_same(kv.second)) it->second.copy_(kv.second);
    } else {
      weights[kv.first] = kv.second.clone();
    }
  }
}

}  // namespace

WeightMap load_weights(const std::string& path, std::map<std::string, std::string>* metadata) {
  const std::vector<uint8_t> raw = read_safetensors_file(path);
  const SafetensorsFile f = parse_safetensors(raw.data(), raw.size(), path);
  WeightMap out;
  for (const auto& kv : f.tensors)
    out[kv.first] = from_bytes(kv.second.dtype, kv.second.shape, kv.second.data, kv.second.nbytes,
                               path + ": tensor '" + kv.first + "'");
  if (metadata) *metadata = f.metadata;
  return out;
}

void save_weights(const std::string& path, const WeightMap& weights, const std::map<std::string, std::string>& metadata) {
  std::map<std::string, at::Tensor> cpu;
  std::map<std::string, SafetensorsTensor> tensors;
  for (const auto& kv : weights) {
    const DtypeName* d = by_type(kv.second.scalar_type());
    if (!d) throw ShapeError("loldu::save_weights: tensor '" + kv.first + "' has dtype " + short_dtype(kv.second.scalar_type()) + ", which safetensors lacks");
    at::Tensor t = kv.second.detach().cpu().contiguous();
    cpu[kv.first] = t;
    tensors[kv.first] = {d->safetensors, t.sizes().vec(), static_cast<const uint8_t*>(t.const_data_ptr()), size_t(t.nbytes())};
  }
  write_file_atomic(path, serialize_safetensors(tensors, metadata));
}

at::Tensor coefficients(const at::Tensor& z, const at::Tensor& sigma, const at::Tensor& D, double sigma0,
                        const std::string& parametrization) {
  // The operation order of adapter_spec.json's formulas (and python/loldu/layer.py coefficients_from),
  // so both sides round alike; each is exactly 0 at initialisation.
  if (parametrization == "relative") return (sigma / sigma0) * (D * z);
  return sigma0 * (z - D) + (sigma - sigma0) * z;
}

at::Tensor weight_matrix(const at::Tensor& weight, const std::string& kind) {
  if (kind == "conv2d") {
    if (weight.dim() != 4) throw ShapeError("loldu::weight_matrix: a conv2d weight is 4-D, got " + shape_str(weight.sizes()));
    return weight.reshape({weight.size(0), -1});
  }
  if (weight.dim() != 2)
    throw ShapeError("loldu::weight_matrix: a " + kind + " weight is 2-D, got " + shape_str(weight.sizes()));
  return kind == "conv1d" ? weight.t() : weight;
}

std::array<uint8_t, 32> fingerprint(const at::Tensor& W, const at::Tensor& pivots) {
  const DtypeName* d = by_type(W.scalar_type());
  if (W.dim() != 2 || !d) throw ShapeError("loldu::fingerprint: W must be a 2-D tensor of a safetensors dtype");
  Sha256 h;
  h.update("loldu-fp1|" + shape_str(W.sizes()) + "|torch." + d->name + "|");
  const int64_t r = pivots.numel();
  if (r > std::min(W.size(0), W.size(1)))
    throw ShapeError("loldu::fingerprint: " + std::to_string(r) + " pivots exceed the smaller side of W " +
                     shape_str(W.sizes()));
  for (const at::Tensor& part : {W.narrow(1, 0, r), W.index_select(0, pivots.to(W.device()))}) {
    at::Tensor c = part.detach().contiguous().cpu();
    h.update(c.const_data_ptr(), size_t(c.nbytes()));
  }
  return h.digest();
}

void check_adapter(const WeightMap& weights, const AdapterFile& adapter) {
  check_layers(BaseView{weights, {}, {}}, adapter);
}

MergeRecord merge_adapter(WeightMap& weights, const AdapterFile& adapter, const MergeOptions& options) {
  Plan plan = plan_merge(BaseView{weights, {}, {}}, adapter, options.keep_base);
  commit(weights, plan.writes);
  return std::move(plan.record);
}

void unmerge_adapter(WeightMap& weights, MergeRecord& record) {
  std::set<std::string> owned;
  const auto writes = plan_unmerge(weights, record, owned);
  commit(weights, writes);
  record.active = false;
  record.layers.clear();
  record.saved.clear();
}

MergeRecord swap_adapter(WeightMap& weights, MergeRecord& current, const AdapterFile& next) {
  BaseView view{weights, {}, {}};
  view.staged = plan_unmerge(weights, current, view.owned, &view.checked);
  Plan plan = plan_merge(view, next, current.keep_base);
  std::map<std::string, at::Tensor> writes = view.staged;  // back to the base, then next's values
  for (auto& kv : plan.writes) writes[kv.first] = kv.second;
  commit(weights, writes);
  current.active = false;
  current.layers.clear();
  current.saved.clear();
  return std::move(plan.record);
}

AdapterFile make_adapter(const WeightMap& weights, const std::vector<std::pair<std::string, std::string>>& targets,
                         const AdapterConfig& config, const std::string& adapter_name) {
  AdapterFile a;
  a.adapter_name = adapter_name;
  a.config = config;
  for (const auto& t : targets) {
    const std::string key = t.first + ".weight";
    auto it = weights.find(key);
    if (it == weights.end()) throw AdapterError("loldu::make_adapter: the weights have no '" + key + "'");
    at::Tensor W;
    try {
      W = weight_matrix(it->second, t.second);
    } catch (const ShapeError& e) {
      throw AdapterError("loldu::make_adapter: layer '" + t.first + "': " + e.what());
    }
    const int64_t r = config.rank_for(t.first, W.size(0), W.size(1));  // "full" (0): min(d, k)
    const float s0 = config.scale_for(t.first, r);
    LduResult f;
    try {
      f = ldu(W, r, config.pivoting);
    } catch (const c10::Error& e) {
      throw AdapterError("loldu::make_adapter: layer '" + t.first + "' " + shape_str(W.sizes()) +
                         " cannot be factorized at rank " + std::to_string(r) + " (" + e.what_without_backtrace() + ")");
    }
    a.layers.push_back({t.first, t.second, W.size(0), W.size(1), short_dtype(W.scalar_type()), r});
    at::Tensor D = f.D.to(at::kFloat).contiguous();
    if (config.parametrization == "relative") a.z.insert(a.z.end(), size_t(r), 0.0);
    else a.z.insert(a.z.end(), D.const_data_ptr<float>(), D.const_data_ptr<float>() + r);
    a.sigma.push_back(s0);
    at::Tensor p = f.pivots.to(at::kInt).contiguous();
    a.pivots.insert(a.pivots.end(), p.const_data_ptr<int32_t>(), p.const_data_ptr<int32_t>() + r);
    a.fingerprints.push_back(fingerprint(W, f.pivots));
  }
  return a;
}

}  // namespace loldu

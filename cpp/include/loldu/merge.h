// Applying adapter files to a model's weights held as a name -> tensor map, without Python:
// merge, unmerge and swap (docs/method.md §1, §2), and safetensors files <-> weight maps.
//
// Keys are the model's state_dict names: the layer "encoder.fc" of an adapter file is the map's
// "encoder.fc.weight", seen as the (d, k) matrix W0 that LoLDU factorizes (weight_matrix). A merge
// re-derives the frozen factors from W0 and the stored pivots (ldu_from_pivots), and writes
//     W <- (W0 + PL diag(c) U) in the weight's dtype,   c = sigma0 (z - D) + (sigma - sigma0) z
// (c = (sigma / sigma0) D z for parametrization "relative"), computed in fp32 (fp64 for fp64
// weights), as python/loldu/layer.py merges. Saved modules
// (format 3) replace the map's "<module>.<tensor>" entries, which unmerge puts back.
//
// Every adapter layer's base weight is checked first (present, kind, (d, k) shape, dtype, and the
// fingerprint of what the factorization reads, as the Python loader checks it): an adapter for
// another base is refused with an AdapterError naming the file and the layer, before any weight
// changes. A merge, unmerge or swap is all-or-nothing: it computes every new weight before writing
// the first (in place, into the map's tensors, so views of them see the change).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <loldu/adapter_file.h>
#include <loldu/errors.h>

namespace loldu {

using WeightMap = std::map<std::string, at::Tensor>;

// A safetensors file as CPU tensors (every dtype safetensors and torch share), and its metadata.
WeightMap load_weights(const std::string& path, std::map<std::string, std::string>* metadata = nullptr);
// Writes `weights` (any device, any layout) as a safetensors file, atomically (see write_file_atomic).
void save_weights(const std::string& path, const WeightMap& weights,
                  const std::map<std::string, std::string>& metadata = {});

// The (d, k) matrix LoLDU factorizes for a layer `kind` (docs/method.md §0), a view of `weight`:
// "linear" and "embedding": the weight; "conv2d": (out, in*kh*kw); "conv1d" (weight stored (in, out)):
// its transpose. Throws ShapeError on a weight of the wrong rank.
at::Tensor weight_matrix(const at::Tensor& weight, const std::string& kind);

// The adapter's coefficients c from z (r,), sigma (0-dim), the pivots D (r,) and sigma0 (the config's
// initial scale), in their dtype: "paper": sigma0 (z - D) + (sigma - sigma0) z, which is sigma z - sigma0 D;
// "relative": (sigma / sigma0) (D z) (docs/method.md §1, §9; python/loldu/adapter_spec.json).
at::Tensor coefficients(const at::Tensor& z, const at::Tensor& sigma, const at::Tensor& D, double sigma0,
                        const std::string& parametrization);

// sha256 of "loldu-fp1|(d, k)|<torch dtype>|", W[:, :r] and W[pivots, :] (row-major bytes): what
// the factorization reads, r = pivots.numel() (int64 row indices).
std::array<uint8_t, 32> fingerprint(const at::Tensor& W, const at::Tensor& pivots);

// Throws AdapterError (naming the file and the layer) unless `adapter` fits `weights`: every layer's
// "<name>.weight" present with the file's kind, (d, k) and dtype, and the same fingerprint; every
// saved tensor's target absent or of the same shape and dtype.
void check_adapter(const WeightMap& weights, const AdapterFile& adapter);

struct MergeOptions {
  // Keep a copy of every weight the merge overwrites, so unmerge and swap restore the base bit for
  // bit (no drift however many swaps). Off: unmerge subtracts the delta as Python's unmerge does,
  // restoring W0[:, :r] and W0[pivots, :] exactly and the rest within rounding of the weight's dtype
  // per unmerge; memory: only (d + k) r numbers per layer instead of a copy of each weight.
  bool keep_base = true;
};

// What a merge changed, for unmerge and swap.
struct MergeRecord {
  struct Layer {
    std::string key;         // "<name>.weight"
    std::string kind;
    at::Tensor pivots;       // (r,) int64
    at::Tensor PL, U, c;     // the factors and coefficients the merge used
    at::Tensor cols, rows;   // W0[:, :r] and W0[pivots, :], restored exactly by unmerge
    at::Tensor base;         // the whole pristine weight (keep_base), else undefined; never written
    // Fingerprints of `base` already computed, by pivots: a swap to an adapter with these pivots
    // compares against them instead of hashing the base again.
    std::vector<std::pair<std::vector<int32_t>, std::array<uint8_t, 32>>> checked;
  };
  struct Saved {
    std::string key;         // "<module>.<tensor>"
    at::Tensor original;     // undefined when the map had no such entry before the merge
  };
  std::string adapter_name;
  std::string source;
  bool keep_base = true;
  bool active = false;       // false once unmerged (or moved into a swap)
  std::vector<Layer> layers;
  std::vector<Saved> saved;
};

// Merges `adapter` into `weights`; nothing changes when it throws.
MergeRecord merge_adapter(WeightMap& weights, const AdapterFile& adapter, const MergeOptions& options = {});

// Undoes `record` (which must come from merge_adapter or swap_adapter on these weights).
void unmerge_adapter(WeightMap& weights, MergeRecord& record);

// Replaces the merged adapter of `current` by `next` in one step: `next` is checked against the base
// that unmerging `current` gives, and nothing changes when it throws. Returns next's record;
// `current` is spent.
MergeRecord swap_adapter(WeightMap& weights, MergeRecord& current, const AdapterFile& next);

// A new adapter (c = 0: z = D, or 0 for "relative"; sigma = sigma0) over `weights` for the layers `targets`
// ((module name, kind) pairs), with pivots from loldu::ldu and the base fingerprints: train or
// edit z and sigma, then save_adapter. Layers keep the order given.
AdapterFile make_adapter(const WeightMap& weights, const std::vector<std::pair<std::string, std::string>>& targets,
                         const AdapterConfig& config, const std::string& adapter_name = "default");

}  // namespace loldu

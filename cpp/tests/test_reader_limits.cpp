// The torch-free reader and writer at their limits, built with -fsanitize=address,undefined like the
// fuzz test: JSON headers parse in linear time; only regular files are read (a FIFO or a device is
// refused before it is opened, so nothing waits or reads without end) and a file whose size is not
// what its header describes is refused before it is allocated; temporaries of killed writers are
// removed and a file size limit fails the write cleanly; z and sigma in F64; the bound on c
// (adapter_spec.json's c_check) and the adapter name rule at write and read.
//
//   test_reader_limits SCRATCH_DIR
#include <loldu/adapter_file.h>
#include <loldu/safetensors.h>
#include <loldu/sha256.h>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "check.h"

namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

std::string scratch;

std::string fresh_dir(const std::string& name) {
  const std::string d = scratch + "/" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write_bytes(const std::string& path, const Bytes& b) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (b.size()) std::fwrite(b.data(), 1, b.size(), f);
  std::fclose(f);
}

// A valid adapter built in C++ (no torch): two layers at rank 3, values away from zero.
loldu::AdapterFile small_adapter(const std::string& z_dtype) {
  loldu::AdapterFile a;
  a.adapter_name = "limits";
  a.config.rank = 3;
  a.config.alpha = 1.5;
  a.z_dtype = z_dtype;
  a.layers = {{"fc1", "linear", 8, 6, "float32"}, {"fc2", "linear", 5, 8, "float64"}};
  for (int i = 0; i < 6; ++i) a.z.push_back(0.1 + 1.0 / 3.0 * (i + 1));  // not exact in float
  a.sigma = {0.7 + 1e-12, -0.3};
  a.pivots = {4, 0, 7, 2, 1, 3};
  a.fingerprints.resize(2);
  for (size_t i = 0; i < 2; ++i) a.fingerprints[i].fill(uint8_t(17 * (i + 1)));
  if (z_dtype == "F32") {
    for (double& v : a.z) v = float(v);
    for (double& v : a.sigma) v = float(v);
  }
  return a;
}

// A safetensors header of n empty tensors: the shape of a hostile header, parsed for its cost.
Bytes empty_tensors(int n) {
  std::string h = "{";
  for (int i = 0; i < n; ++i)
    h += std::string(i ? "," : "") + "\"t" + std::to_string(i) + "\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
  h += "}";
  Bytes b(8);
  for (int i = 0; i < 8; ++i) b[i] = uint8_t(uint64_t(h.size()) >> (8 * i));
  b.insert(b.end(), h.begin(), h.end());
  return b;
}

double parse_seconds(const Bytes& b) {
  double best = 1e9;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string msg = loldu_test::error_of([&] { loldu::parse_adapter(b.data(), b.size(), "many"); });
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    LOLDU_CHECK(msg.find("many: not a loldu adapter file") == 0);  // parsed whole, then refused
  }
  return best;
}

// The parse cost grows linearly: 4x the entries must cost well under the 16x of a quadratic parse.
void test_parse_is_linear() {
  const Bytes small = empty_tensors(25000), large = empty_tensors(100000);
  const double t_small = parse_seconds(small), t_large = parse_seconds(large);
  std::printf("parse of 25k / 100k empty tensors: %.3f s / %.3f s (ratio %.1f)\n", t_small, t_large, t_large / t_small);
  LOLDU_CHECK(t_large / t_small < 8.0);
  // The depth limit still holds, on either side of the bound.
  std::string deep = "{\"a\":" + std::string(size_t(loldu::kMaxJsonDepth), '[') + std::string(size_t(loldu::kMaxJsonDepth), ']') + "}";
  Bytes d(8);
  for (int i = 0; i < 8; ++i) d[i] = uint8_t(uint64_t(deep.size()) >> (8 * i));
  d.insert(d.end(), deep.begin(), deep.end());
  LOLDU_CHECK(loldu_test::error_of([&] { loldu::parse_safetensors(d.data(), d.size(), "deep"); })
                  .find("nested more than") != std::string::npos);
  // Brackets inside strings (an escaped quote included) do not count.
  const std::string ok = "{\"__metadata__\":{\"k\":\"[[[[[[[[[[\\\"{{{{{{{{{{\"}}";
  Bytes o(8);
  for (int i = 0; i < 8; ++i) o[i] = uint8_t(uint64_t(ok.size()) >> (8 * i));
  o.insert(o.end(), ok.begin(), ok.end());
  LOLDU_CHECK(loldu::parse_safetensors(o.data(), o.size(), "strings").metadata.at("k") == "[[[[[[[[[[\"{{{{{{{{{{");
}

// Each read of a special file must end (alarm: a hang fails the test instead of stalling ctest).
void test_special_files() {
  const std::string dir = fresh_dir("special");
  const loldu::SerializedAdapter s = loldu::serialize_adapter(small_adapter("F32"));
  const std::string fifo_dir = fresh_dir("special/fifo"), weights = fifo_dir + "/" + loldu::kAdapterWeightsName;
  LOLDU_CHECK(::mkfifo(weights.c_str(), 0600) == 0);
  ::alarm(20);
  std::string msg = loldu_test::error_of([&] { loldu::read_adapter(fifo_dir); });
  LOLDU_CHECK(msg.find(weights + ": not a regular file (a FIFO)") == 0);
  msg = loldu_test::error_of([&] { loldu::read_safetensors_file(weights); });  // load_weights' reader
  LOLDU_CHECK(msg.find(weights + ": not a regular file") == 0);

  // A FIFO as the readable config copy: a warning, no wait.
  const std::string copy_dir = fresh_dir("special/copy");
  write_bytes(copy_dir + "/" + loldu::kAdapterWeightsName, s.weights);
  LOLDU_CHECK(::mkfifo((copy_dir + "/" + loldu::kAdapterConfigName).c_str(), 0600) == 0);
  std::vector<std::string> warnings;
  LOLDU_CHECK(loldu::read_adapter(copy_dir, &warnings).adapter_name == "limits" && warnings.size() == 1);

  // A symlink to /dev/zero reads without end: refused by its type.
  const std::string zero_dir = fresh_dir("special/zero");
  fs::create_symlink("/dev/zero", zero_dir + "/" + loldu::kAdapterWeightsName);
  msg = loldu_test::error_of([&] { loldu::read_adapter(zero_dir); });
  LOLDU_CHECK(msg.find("not a regular file (a character device)") != std::string::npos);
  // A symlink to a regular file (as model caches keep them) is read.
  const std::string link_dir = fresh_dir("special/link");
  fs::create_symlink(fs::absolute(copy_dir + "/" + loldu::kAdapterWeightsName), link_dir + "/" + loldu::kAdapterWeightsName);
  LOLDU_CHECK(loldu::read_adapter(link_dir).adapter_name == "limits");
  ::alarm(0);

  // A valid adapter grown to 12 GB (sparse: no disk used): refused by its header before allocating.
  const std::string big_dir = fresh_dir("special/big"), big = big_dir + "/" + loldu::kAdapterWeightsName;
  write_bytes(big, s.weights);
  LOLDU_CHECK(::truncate(big.c_str(), off_t(12) << 30) == 0);
  msg = loldu_test::error_of([&] { loldu::read_adapter(big_dir); });
  LOLDU_CHECK(msg.find(big + ": safetensors data is") == 0 && msg.find("trailing bytes") != std::string::npos);
  // A header claiming more than the file holds.
  Bytes head = s.weights;
  head.resize(head.size() - 4);
  write_bytes(big, head);
  msg = loldu_test::error_of([&] { loldu::read_safetensors_file(big); });
  LOLDU_CHECK(msg.find(big + ": safetensors header: tensor") == 0 && msg.find("past the end") != std::string::npos);
  // read_file_bytes' own bound.
  msg = loldu_test::error_of([&] { loldu::read_file_bytes(big, 16); });
  LOLDU_CHECK(msg.find(big + ": ") == 0 && msg.find("more than the 16 expected") != std::string::npos);
}

std::string temp_name(const std::string& target, const std::string& middle) {
  return "." + target + "." + middle + ".tmp";
}

// Temporaries of killed writers are removed by the next write (python/loldu/atomic.py's rule);
// a live writer's stays; a file size limit fails the write with nothing left behind.
void test_temporaries() {
  const std::string dir = fresh_dir("temps"), target = "w.safetensors", path = dir + "/" + target;
  const Bytes body(4096, 7);
  // A writer killed while it held its temporary: a child that locks one and is then SIGKILLed.
  int ready[2];
  LOLDU_CHECK(::pipe(ready) == 0);
  const pid_t child = ::fork();
  if (child == 0) {
    const std::string tmp = dir + "/" + temp_name(target, std::to_string(::getpid()) + "-child123");
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
    ::flock(fd, LOCK_EX);
    (void)!::write(fd, "partial", 7);
    (void)!::write(ready[1], "x", 1);
    ::pause();
    ::_exit(0);
  }
  char c;
  LOLDU_CHECK(::read(ready[0], &c, 1) == 1);
  const std::string child_tmp = dir + "/" + temp_name(target, std::to_string(child) + "-child123");
  // Left by dead writers: non-empty unlocked; empty with a dead pid. Kept: another target's; a name
  // not of the pattern; an empty one of a live pid (between creating and locking).
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ::waitpid(dead, nullptr, 0);
  const std::string gone1 = dir + "/" + temp_name(target, "999999-abcdefgh"),
                    gone2 = dir + "/" + temp_name(target, std::to_string(dead) + "-abc_efgh"),
                    kept1 = dir + "/" + temp_name("other.safetensors", "999999-abcdefgh"),
                    kept2 = dir + "/" + temp_name(target, "999999-abcdefg"),
                    kept3 = dir + "/" + temp_name(target, std::to_string(::getpid()) + "-zzzzzzzz");
  write_bytes(gone1, body);
  write_bytes(gone2, {});
  write_bytes(kept1, body);
  write_bytes(kept2, body);
  write_bytes(kept3, {});
  loldu::write_file_atomic(path, body);
  LOLDU_CHECK(!fs::exists(gone1) && !fs::exists(gone2));
  LOLDU_CHECK(fs::exists(kept1) && fs::exists(kept2) && fs::exists(kept3));
  LOLDU_CHECK(fs::exists(child_tmp));  // its writer lives and holds the lock
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  loldu::write_file_atomic(path, body);
  LOLDU_CHECK(!fs::exists(child_tmp));  // the kernel dropped the dead writer's lock

  // ulimit -f: the write fails with EFBIG (not SIGXFSZ), the temporary is gone, the old file stays.
  const pid_t limited = ::fork();
  if (limited == 0) {
    struct rlimit rl = {1024, 1024};
    ::setrlimit(RLIMIT_FSIZE, &rl);
    const std::string msg = loldu_test::error_of([&] { loldu::write_file_atomic(path, Bytes(1 << 20, 9)); });
    ::_exit(msg.find(path + ": cannot write (File too large)") == 0 ? 0 : 3);
  }
  int status = 0;
  ::waitpid(limited, &status, 0);
  LOLDU_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  size_t temps = 0;
  for (const auto& e : fs::directory_iterator(dir))
    temps += e.path().filename().string().rfind("." + target + ".", 0) == 0;
  LOLDU_CHECK(temps == 2);  // kept2 and kept3, none new (kept1 is another target's)
  LOLDU_CHECK(fs::file_size(path) == body.size());
}

// Re-signs a file after its tensors or config changed (both hashes recomputed).
Bytes resign(const Bytes& file, const std::map<std::string, loldu::SafetensorsTensor>& tensors, nlohmann::json header) {
  const loldu::SafetensorsFile st = loldu::parse_safetensors(file.data(), file.size(), "resign");
  header["data_sha256"] = loldu::data_hash(tensors);
  std::map<std::string, std::string> meta = st.metadata;
  const std::string text = header.dump(1) + "\n";
  meta["loldu_config"] = text;
  meta["loldu_config_sha256"] = loldu::to_hex(loldu::sha256(text.data(), text.size()));
  return loldu::serialize_safetensors(tensors, meta);
}

void test_f64_and_c_bound() {
  // F64 z and sigma: written and read back exactly, in F64.
  const loldu::AdapterFile a = small_adapter("F64");
  const loldu::SerializedAdapter s = loldu::serialize_adapter(a);
  const loldu::AdapterFile back = loldu::parse_adapter(s.weights.data(), s.weights.size(), "f64");
  LOLDU_CHECK(back.z_dtype == "F64" && back.z == a.z && back.sigma == a.sigma);
  const loldu::SafetensorsFile st = loldu::parse_safetensors(s.weights.data(), s.weights.size(), "f64");
  LOLDU_CHECK(st.tensors.at("z").dtype == "F64" && st.tensors.at("sigma").dtype == "F64");
  // F32: rounded to float on write.
  loldu::AdapterFile f32 = a;
  f32.z_dtype = "F32";
  const loldu::SerializedAdapter s32 = loldu::serialize_adapter(f32);
  const loldu::AdapterFile back32 = loldu::parse_adapter(s32.weights.data(), s32.weights.size(), "f32");
  LOLDU_CHECK(back32.z_dtype == "F32" && back32.z[0] == double(float(a.z[0])) && back32.z[0] != a.z[0]);
  // z F64 with sigma F32 (re-signed, so the dtype check itself refuses it).
  std::map<std::string, loldu::SafetensorsTensor> mixed = st.tensors;
  const std::vector<float> sigma32(a.sigma.begin(), a.sigma.end());
  mixed["sigma"] = {"F32", {2}, reinterpret_cast<const uint8_t*>(sigma32.data()), sigma32.size() * 4};
  const Bytes m = resign(s.weights, mixed, nlohmann::json::parse(s.config_text));
  std::string msg = loldu_test::error_of([&] { loldu::parse_adapter(m.data(), m.size(), "mixed"); });
  LOLDU_CHECK(msg.find("mixed: tensor 'sigma' is F32 but 'z' is F64") == 0);
  // Another dtype: the allowed ones are named.
  std::map<std::string, loldu::SafetensorsTensor> f16 = st.tensors;
  const std::vector<uint16_t> half(6, 0x3c00);
  f16["z"] = {"F16", {6}, reinterpret_cast<const uint8_t*>(half.data()), 12};
  const Bytes h = resign(s.weights, f16, nlohmann::json::parse(s.config_text));
  msg = loldu_test::error_of([&] { loldu::parse_adapter(h.data(), h.size(), "half"); });
  LOLDU_CHECK(msg.find("half: tensor 'z' is F16 (6,), expected F32 or F64 (6,) (2 layers, ranks summing to 6)") == 0);
  // Format 4: z is the layers' vectors concatenated; the (L, r) layout of formats 2 and 3 is refused.
  std::map<std::string, loldu::SafetensorsTensor> stacked = st.tensors;
  stacked["z"].shape = {2, 3};
  const Bytes sk = resign(s.weights, stacked, nlohmann::json::parse(s.config_text));
  msg = loldu_test::error_of([&] { loldu::parse_adapter(sk.data(), sk.size(), "stacked"); });
  LOLDU_CHECK(msg.find("stacked: tensor 'z' is F64 (2, 3), expected F32 or F64 (6,)") == 0);

  // c: z = sigma = 3e38 (finite in fp32) gives sigma * z = 9e76: refused at write and at read.
  loldu::AdapterFile huge = small_adapter("F32");
  for (double& v : huge.z) v = 3e38;
  for (double& v : huge.sigma) v = 3e38;
  msg = loldu_test::error_of([&] { loldu::serialize_adapter(huge); });
  LOLDU_CHECK(msg.find("layer 'fc1': sigma * z = 9") != std::string::npos);
  std::map<std::string, loldu::SafetensorsTensor> big = loldu::parse_safetensors(s32.weights.data(), s32.weights.size(), "x").tensors;
  const std::vector<float> z_big(6, 3e38f), s_big(2, 3e38f);
  big["z"].data = reinterpret_cast<const uint8_t*>(z_big.data());
  big["sigma"].data = reinterpret_cast<const uint8_t*>(s_big.data());
  const Bytes hb = resign(s32.weights, big, nlohmann::json::parse(s32.config_text));
  msg = loldu_test::error_of([&] { loldu::parse_adapter(hb.data(), hb.size(), "huge"); });
  LOLDU_CHECK(msg.find("huge: layer 'fc1': sigma * z") == 0 && msg.find("1e+30") != std::string::npos);
  // At the bound: accepted; just past it: refused (relative form: (sigma / sigma0) * z).
  loldu::AdapterFile edge = small_adapter("F64");
  edge.config.parametrization = "relative";
  edge.config.sigma0 = 0.5;
  edge.sigma = {1.0, 1.0};
  edge.z.assign(6, 0.5 * loldu::spec::kCAbsMax);
  LOLDU_CHECK(loldu_test::error_of([&] { loldu::serialize_adapter(edge); }).empty());
  edge.z[4] = 0.5 * loldu::spec::kCAbsMax * (1 + 1e-15);
  msg = loldu_test::error_of([&] { loldu::serialize_adapter(edge); });
  LOLDU_CHECK(msg.find("layer 'fc2': sigma / sigma0 * z") != std::string::npos);

  // Names the Python loader refuses are not written; NaN alpha is named as such.
  loldu::AdapterFile named = small_adapter("F32");
  named.adapter_name = "../../x";
  LOLDU_CHECK(loldu_test::error_of([&] { loldu::serialize_adapter(named); }).find("adapter name must match") != std::string::npos);
  named.adapter_name = "ok_name-2";
  named.config.alpha = std::nan("");
  LOLDU_CHECK(loldu_test::error_of([&] { loldu::serialize_adapter(named); }).find("alpha must be a finite number, got nan") !=
              std::string::npos);
}

}  // namespace

// Per-layer ranks (format 4): rank "full" and a rank_pattern / alpha_pattern, written from C++ and
// read back; each layer's stored rank must be what the config gives it.
void test_ragged_ranks() {
  loldu::AdapterFile a = small_adapter("F32");  // fc1 (8, 6), fc2 (5, 8)
  a.config.rank = 0;                            // "full": 6 and 5
  a.config.alpha_pattern = {{"fc2", 4.0}};
  a.z.clear();
  for (int i = 0; i < 11; ++i) a.z.push_back(float(0.2 + 0.1 * i));
  a.pivots = {0, 1, 2, 3, 4, 5, 4, 3, 2, 1, 0};
  const loldu::SerializedAdapter s = loldu::serialize_adapter(a);
  const loldu::AdapterFile back = loldu::parse_adapter(s.weights.data(), s.weights.size(), "ragged");
  LOLDU_CHECK(back.format_version == 4 && back.config.rank == 0 && back.layers[0].rank == 6 && back.layers[1].rank == 5);
  LOLDU_CHECK(back.offsets() == std::vector<size_t>({0, 6, 11}) && back.z == a.z && back.pivots == a.pivots);
  LOLDU_CHECK(back.config.scale_for("fc1", 6) == float(1.5 / 6) && back.config.scale_for("fc2", 5) == float(4.0 / 5));
  const nlohmann::json header = nlohmann::json::parse(s.config_text);
  LOLDU_CHECK(header["config"]["rank"] == "full" && header["config"]["alpha_pattern"]["fc2"] == 4.0);
  LOLDU_CHECK(header["layers"][0]["rank"] == 6 && header["layers"][1]["rank"] == 5);
  // A rank_pattern: the first key that matches wins unless a key equals the name; regex keys match whole.
  loldu::AdapterConfig c;
  c.rank = 4;
  c.rank_pattern = {{"f.2", 2}, {"fc", 0}, {"fc1", 3}, {"net.fc2", 5}};
  LOLDU_CHECK(c.rank_for("fc1", 8, 6) == 3 && c.rank_for("fc2", 8, 6) == 2 && c.rank_for("fc", 8, 6) == 6);
  LOLDU_CHECK(c.rank_for("a.fc", 8, 6) == 6 && c.rank_for("net.fc2", 8, 6) == 5 && c.rank_for("fc3", 8, 6) == 4);
  // A stored rank the config does not give the layer is refused, naming it.
  nlohmann::json bad = header;
  bad["layers"][1]["rank"] = 4;
  const loldu::SafetensorsFile st = loldu::parse_safetensors(s.weights.data(), s.weights.size(), "ragged");
  const Bytes b = resign(s.weights, st.tensors, bad);
  std::string msg = loldu_test::error_of([&] { loldu::parse_adapter(b.data(), b.size(), "bad"); });
  LOLDU_CHECK(msg.find("bad: layer 'fc2': rank 4 in the file, but its config gives the layer rank 5") == 0);
  // Per-layer ranks need format 4: a rank "full" config is refused in a format-3 file.
  nlohmann::json old = header;
  old["format_version"] = 3;
  std::map<std::string, std::string> meta = st.metadata;
  meta["loldu_format"] = "loldu-adapter/3";
  const std::string text = old.dump(1) + "\n";
  meta["loldu_config"] = text;
  meta["loldu_config_sha256"] = loldu::to_hex(loldu::sha256(text.data(), text.size()));
  const Bytes v3 = loldu::serialize_safetensors(st.tensors, meta);
  msg = loldu_test::error_of([&] { loldu::parse_adapter(v3.data(), v3.size(), "v3"); });
  LOLDU_CHECK(msg.find("v3: format_version 3 holds one int rank for all layers") == 0);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: test_reader_limits SCRATCH_DIR\n");
    return 2;
  }
  scratch = argv[1];
  fs::create_directories(scratch);
  test_parse_is_linear();
  test_special_files();
  test_temporaries();
  test_f64_and_c_bound();
  test_ragged_ranks();
  return loldu_test::finish("test_reader_limits");
}

// bench/quality/quality.cpp: kvc_quality, the quality evaluation of every scorer x budget
// against the uncompressed cache and the oracle, and of eviction, quantization and both at
// equal bytes, on synthetic suites or a real model's dump. README.md in this directory
// describes the protocol, the metrics and the suites; `kvc_quality --help` lists the options.
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "evaluate.hpp"
#include "synthetic.hpp"
#include "workload.hpp"

namespace {

using quality::result_row;

const char* const usage_text =
    "usage: kvc_quality [options]\n"
    "\n"
    "Compares every scorer x budget (bench/quality/policies.hpp) at several compression ratios\n"
    "against the uncompressed cache and the oracle, and eviction, quantization and both at equal\n"
    "bytes (bench/quality/mixes.hpp). See bench/quality/README.md.\n"
    "\n"
    "Synthetic suites (the default):\n"
    "  --suite LIST         local, diffuse, needle, blind, mixed, or all (default: all)\n"
    "  --layers N           (4)    --q-heads N (16)   --kv-heads N (4)   --head-dim N (128)\n"
    "  --context N          cached tokens (2048)\n"
    "  --heldout N          held-out queries after the context (32)\n"
    "  --window N           observed queries at the end of the context (64)\n"
    "  --tiny               2 layers, 4 q / 2 kv heads, head_dim 64, context 256, 8 held out,\n"
    "                       window 16: a few seconds, for tests\n"
    "  --write-npy DIR      also write each suite as a dump, DIR/<suite>/{q,k,v}_<layer>.npy\n"
    "\n"
    "A real model's dump:\n"
    "  --npy-dir DIR        q_<l>.npy [T, q_heads, d], k_<l>.npy and v_<l>.npy [T, kv_heads, d],\n"
    "                       float32 (or float16, float64), after RoPE, positions 0..T-1, l = 0, 1, ...\n"
    "  --rope-theta X       the model's RoPE base (required with --npy-dir; synthetic: 500000)\n"
    "  --rotary-dims N      rotated dimensions per head (default: all)\n"
    "  --rope-layout L      half_split (Hugging Face Llama, GPT-NeoX; default) or interleaved (GPT-J)\n"
    "  --name NAME          suite name in the output (default: the directory's name)\n"
    "  --context N          cached tokens (default: T - heldout)\n"
    "  --heldout N          held-out queries (32); --window N observed queries (64)\n"
    "  --max-layers N       the first N layers only\n"
    "\n"
    "Both:\n"
    "  --rows LIST          policies (every scorer x budget at every ratio), codecs (eviction,\n"
    "                       quantization and both at equal bytes), or both (default: policies)\n"
    "  --ratios LIST        compression ratios, fractions removed (0.25,0.5,0.75,0.9,0.95)\n"
    "  --scorers LIST       only these scorers;  --budgets LIST  only these budgets\n"
    "  --byte-budgets LIST  codec rows: fractions of the f16 cache's bytes (default: each codec's\n"
    "                       own size, and half the smallest)\n"
    "  --mix-scorers LIST   codec rows: the scorers that evict (oracle,snapkv,compactor)\n"
    "  --threads N          worker threads (default: hardware threads, at most 16)\n"
    "  --prefill-attend     observe every cached query, not only the window (H2O's statistics\n"
    "                       then cover the whole prefill; costs context^2 attention)\n"
    "  --csv PATH           every row as CSV\n"
    "  --metrics LIST       tables on stdout: rel_error, mass_kept, recall, needle_hit, kept,\n"
    "                       needle_kept, compress_ms, or none (default: the first four); the codec\n"
    "                       rows' table has its own columns, and none drops it too\n"
    "  --check              check sanity properties (README.md); exit 1 if one fails\n"
    "  --expect CSV         rel_error, mass_kept and recall must equal the rows of this CSV with\n"
    "                       the same suite, policy and ratio (or codec, mix and byte budget); exit 1\n"
    "                       otherwise\n"
    "  --list               print the policies and exit\n"
    "\n"
    "Exit status: 0; 1 when a check failed or a policy could not compress (its cells read \"fail\"\n"
    "and stderr names it); 2 on a bad option or unreadable input.\n";

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
[[noreturn]] void
die(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "kvc_quality: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  std::exit(2);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= s.size()) {
    const std::size_t end = s.find(',', start);
    const std::string part = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!part.empty()) out.push_back(part);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

int to_int(const char* flag, const char* s) {
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v < 0 || v > 1 << 24) die("%s: expected a non-negative integer", flag);
  return static_cast<int>(v);
}

double to_double(const char* flag, const char* s) {
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  if (end == s || *end != '\0' || !std::isfinite(v)) die("%s: expected a number", flag);
  return v;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  for (const std::string& x : v)
    if (x == s) return true;
  return false;
}

struct options {
  std::vector<std::string> suites;
  quality::synthetic_config synth;
  std::string npy_dir, name, write_npy, csv, expect;
  bool have_theta = false, have_context = false, check = false, list = false, policy_rows = true;
  const char* synthetic_only = nullptr;  // the last option that only the synthetic suites take
  int max_layers = 0;
  std::vector<std::string> scorers, budgets;
  std::vector<std::string> metrics = {"rel_error", "mass_kept", "recall", "needle_hit"};
  quality::eval_options eval;
};

options parse(int argc, char** argv) {
  options o;
  o.eval.ratios = {0.25, 0.5, 0.75, 0.9, 0.95};
  const unsigned hw = std::thread::hardware_concurrency();
  o.eval.threads = hw == 0 ? 1 : static_cast<int>(hw < 16 ? hw : 16);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) die("%s needs a value", argv[i]);
      return argv[++i];
    };
    const char* flag = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(usage_text, stdout);
      std::exit(0);
    } else if (a == "--suite") {
      o.suites = split(value());
      o.synthetic_only = flag;
    } else if (a == "--layers") {
      o.synth.layers = to_int(flag, value());
      o.synthetic_only = flag;
    } else if (a == "--q-heads") {
      o.synth.q_heads = to_int(flag, value());
      o.synthetic_only = flag;
    } else if (a == "--kv-heads") {
      o.synth.kv_heads = to_int(flag, value());
      o.synthetic_only = flag;
    } else if (a == "--head-dim") {
      o.synth.head_dim = to_int(flag, value());
      o.synthetic_only = flag;
    } else if (a == "--context") {
      o.synth.context = to_int(flag, value());
      o.have_context = true;
    } else if (a == "--heldout") {
      o.synth.heldout = to_int(flag, value());
    } else if (a == "--window") {
      o.synth.window = to_int(flag, value());
    } else if (a == "--tiny") {
      o.synthetic_only = flag;
      o.synth.layers = 2;
      o.synth.q_heads = 4;
      o.synth.kv_heads = 2;
      o.synth.head_dim = 64;
      o.synth.context = 256;
      o.synth.heldout = 8;
      o.synth.window = 16;
    } else if (a == "--write-npy") {
      o.write_npy = value();
    } else if (a == "--npy-dir") {
      o.npy_dir = value();
    } else if (a == "--name") {
      o.name = value();
    } else if (a == "--rope-theta") {
      o.synth.rope.theta = to_double(flag, value());
      o.have_theta = true;
    } else if (a == "--rotary-dims") {
      o.synth.rope.rotary_dims = to_int(flag, value());
    } else if (a == "--rope-layout") {
      const std::string l = value();
      if (l == "half_split")
        o.synth.rope.layout = kvc::rope_layout::half_split;
      else if (l == "interleaved")
        o.synth.rope.layout = kvc::rope_layout::interleaved;
      else
        die("--rope-layout: expected half_split or interleaved, not '%s'", l.c_str());
    } else if (a == "--max-layers") {
      o.max_layers = to_int(flag, value());
    } else if (a == "--ratios") {
      o.eval.ratios.clear();
      for (const std::string& r : split(value())) {
        const double x = to_double(flag, r.c_str());
        if (!(x >= 0.0 && x < 1.0)) die("--ratios: '%s' is outside [0, 1)", r.c_str());
        o.eval.ratios.push_back(x);
      }
      if (o.eval.ratios.empty()) die("--ratios: no ratio given");
    } else if (a == "--rows") {
      o.policy_rows = o.eval.codec_rows = false;
      for (const std::string& r : split(value())) {
        if (r == "policies")
          o.policy_rows = true;
        else if (r == "codecs")
          o.eval.codec_rows = true;
        else
          die("--rows: expected policies or codecs, not '%s'", r.c_str());
      }
      if (!o.policy_rows && !o.eval.codec_rows) die("--rows: no rows given");
    } else if (a == "--byte-budgets") {
      o.eval.byte_budgets.clear();
      for (const std::string& b : split(value())) {
        const double x = to_double(flag, b.c_str());
        if (!(x > 0.0 && x <= 1.0)) die("--byte-budgets: '%s' is outside (0, 1]", b.c_str());
        o.eval.byte_budgets.push_back(x);
      }
      if (o.eval.byte_budgets.empty()) die("--byte-budgets: no budget given");
    } else if (a == "--mix-scorers") {
      o.eval.mix_scorers = split(value());
      if (o.eval.mix_scorers.empty()) die("--mix-scorers: no scorer given");
    } else if (a == "--scorers") {
      o.scorers = split(value());
    } else if (a == "--budgets") {
      o.budgets = split(value());
    } else if (a == "--threads") {
      o.eval.threads = to_int(flag, value());
    } else if (a == "--prefill-attend") {
      o.eval.prefill_attend = true;
    } else if (a == "--csv") {
      o.csv = value();
    } else if (a == "--metrics") {
      o.metrics = split(value());
      if (o.metrics.size() == 1 && o.metrics[0] == "none") o.metrics.clear();
    } else if (a == "--check") {
      o.check = true;
    } else if (a == "--expect") {
      o.expect = value();
    } else if (a == "--list") {
      o.list = true;
    } else {
      die("unknown option '%s' (--help lists the options)", a.c_str());
    }
  }
  if (!o.npy_dir.empty() && !o.have_theta)
    die("--npy-dir needs --rope-theta (the model's RoPE base, e.g. 10000 or 500000)");
  if (!o.npy_dir.empty() && !o.write_npy.empty()) die("--write-npy writes synthetic suites; drop --npy-dir");
  if (!o.npy_dir.empty() && o.synthetic_only != nullptr)
    die("%s is for the synthetic suites; a dump brings its own shape (drop it or --npy-dir)", o.synthetic_only);
  return o;
}

// ------------------------------------------------------------------ output

const char* metric_title(const std::string& m) {
  if (m == "rel_error") return "relative L2 error of the attention output (lower is better)";
  if (m == "mass_kept") return "attention mass kept: full-cache attention on the retained tokens (higher is better)";
  if (m == "recall") return "recall of the oracle's kept set (higher is better)";
  if (m == "needle_hit") return "needle hit rate: the held-out query's argmax is the needle (higher is better)";
  if (m == "needle_kept") return "needles retained (higher is better)";
  if (m == "kept") return "fraction of tokens retained";
  if (m == "compress_ms") return "compress time, whole sequence (ms)";
  return nullptr;
}

double metric_of(const result_row& r, const std::string& m) {
  if (m == "rel_error") return r.rel_error;
  if (m == "mass_kept") return r.mass_kept;
  if (m == "recall") return r.recall;
  if (m == "needle_hit") return r.needle_hit;
  if (m == "needle_kept") return r.needle_kept;
  if (m == "kept") return r.kept;
  if (m == "compress_ms") return r.compress_ms;
  return std::nan("");
}

void print_header(const quality::workload& w, const quality::reference_info& info, std::size_t n_policies,
                  std::size_t n_ratios, std::size_t n_codec_rows) {
  const kvc::model_shape& s = w.shape;
  std::printf("\n== %s: %s\n", w.name.c_str(), w.description.c_str());
  std::printf(
      "   %d layers, %d q / %d kv heads, head_dim %d; %d cached + %d held-out tokens, window %d; RoPE theta %g, "
      "%d rotary dims, %s\n",
      s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim, w.context, w.heldout(), w.window, w.rope.theta,
      w.rope.dims(s.head_dim), w.rope.layout == kvc::rope_layout::half_split ? "half_split" : "interleaved");
  std::printf(
      "   full cache, held-out queries: %.0f%% of attention on positions 0-3, %.0f%% on each query's top 5%% "
      "of tokens",
      100.0 * info.sink_mass, 100.0 * info.top_mass);
  if (!std::isnan(info.needle_hit)) std::printf("; argmax on the needle %.0f%%", 100.0 * info.needle_hit);
  std::printf("\n   ");
  if (n_policies > 0) std::printf("%zu policies x %zu ratios%s", n_policies, n_ratios, n_codec_rows > 0 ? ", " : "");
  if (n_codec_rows > 0) std::printf("%zu codec rows", n_codec_rows);
  std::printf(" in %.1f s\n", info.seconds);
}

// Failures, one line per policy and message, before the tables (whose cells then read "fail").
void print_failures(const std::vector<result_row>& rows) {
  std::vector<std::pair<std::string, std::string>> failed;  // (policy, message)
  std::map<std::pair<std::string, std::string>, std::string> failed_at;
  for (const result_row& r : rows) {
    if (r.error.empty()) continue;
    const std::pair<std::string, std::string> key{r.policy(), r.error};
    char at[32];
    std::snprintf(at, sizeof at, "%g", r.codec_row() ? r.byte_budget : r.ratio);
    std::string& list = failed_at[key];
    if (list.empty()) failed.push_back(key);
    list += list.empty() ? std::string(r.codec_row() ? "byte budget " : "ratio ") + at : std::string(", ") + at;
  }
  for (const auto& f : failed)
    std::printf("   FAILED %s at %s: %s\n", f.first.c_str(), failed_at[f].c_str(), f.second.c_str());
}

void print_tables(const std::vector<result_row>& rows, const std::vector<std::string>& metrics,
                  const std::vector<double>& ratios) {
  // Policy rows of one suite arrive in (policy, ratio) order.
  std::vector<std::string> policies;
  std::map<std::pair<std::string, double>, const result_row*> at;
  for (const result_row& r : rows) {
    if (r.codec_row()) continue;
    if (!contains(policies, r.policy())) policies.push_back(r.policy());
    at[{r.policy(), r.ratio}] = &r;
  }
  if (policies.empty()) return;
  for (const std::string& m : metrics) {
    bool any = false;
    for (const result_row& r : rows) any = any || (!r.codec_row() && !std::isnan(metric_of(r, m)));
    if (!any) continue;
    std::printf("\n%s\n%-26s", metric_title(m), "policy \\ ratio");
    for (double x : ratios) std::printf(" %7.2f", x);
    std::printf("\n");
    for (const std::string& p : policies) {
      std::printf("%-26s", p.c_str());
      for (double x : ratios) {
        const auto it = at.find({p, x});
        const bool fail = it != at.end() && !it->second->error.empty();
        const double v = it == at.end() || fail ? std::nan("") : metric_of(*it->second, m);
        if (fail)
          std::printf(" %7s", "fail");
        else if (std::isnan(v))
          std::printf(" %7s", "-");
        else
          std::printf(m == "compress_ms" ? " %7.1f" : " %7.3f", v);
      }
      std::printf("\n");
    }
  }
}

// Codec rows of one suite, in (byte budget, codec, scorer) order: a block per budget, the
// least error among the mixes that do not evict with the oracle marked.
void print_codec_table(const std::vector<result_row>& rows) {
  bool any = false, needles = false;
  for (const result_row& r : rows) {
    any = any || r.codec_row();
    needles = needles || (r.codec_row() && !std::isnan(r.needle_hit));
  }
  if (!any) return;
  std::printf(
      "\neviction and quantization at equal bytes: bytes are the pages the compressed sequence holds\n"
      "(stats()), over the f16 cache's with every token; error against the uncompressed f32 cache\n"
      "%-8s %-24s %7s %7s %9s %9s%s\n",
      "budget", "mix", "bytes", "kept", "rel_error", "mass_kept", needles ? " needle_hit" : "");
  for (std::size_t i = 0; i < rows.size();) {
    if (!rows[i].codec_row()) {
      ++i;
      continue;
    }
    std::size_t end = i;
    const result_row* best = nullptr;
    for (; end < rows.size() && rows[end].codec_row() && rows[end].byte_budget == rows[i].byte_budget; ++end) {
      const result_row& r = rows[end];
      if (r.error.empty() && r.scorer != "oracle" && (best == nullptr || r.rel_error < best->rel_error)) best = &r;
    }
    for (std::size_t k = i; k < end; ++k) {
      const result_row& r = rows[k];
      char budget[16] = "";
      if (k == i) std::snprintf(budget, sizeof budget, "%.3f", r.byte_budget);
      std::printf("%-8s %-24s", budget, r.policy().c_str());
      if (!r.error.empty()) {
        std::printf(" %7s\n", "fail");
        continue;
      }
      std::printf(" %7.3f %7.3f %9.4f %9.3f", r.bytes, r.kept, r.rel_error, r.mass_kept);
      if (needles && std::isnan(r.needle_hit))
        std::printf(" %10s", "-");
      else if (needles)
        std::printf(" %10.3f", r.needle_hit);
      std::printf("%s\n", &r == best ? "   <- least error" : "");
    }
    i = end;
  }
}

void csv_number(std::FILE* f, double v) {
  if (std::isnan(v))
    std::fputc(',', f);
  else
    std::fprintf(f, ",%.9g", v);
}

bool write_csv(const std::string& path, const std::vector<result_row>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return false;
  std::fprintf(
      f,
      "suite,scorer,budget,ratio,kept,rel_error,mass_kept,recall,needle_kept,needle_hit,compress_ms,error,codec,"
      "byte_budget,bytes,error_bound\n");
  for (const result_row& r : rows) {
    std::fprintf(f, "%s,%s,%s,%g", r.suite.c_str(), r.scorer.c_str(), r.budget.c_str(), r.ratio);
    for (double v : {r.kept, r.rel_error, r.mass_kept, r.recall, r.needle_kept, r.needle_hit}) csv_number(f, v);
    std::fprintf(f, ",%.2f,", r.compress_ms);
    for (const char* c = r.error.c_str(); *c != '\0'; ++c) std::fputc(*c == ',' || *c == '\n' ? ';' : *c, f);
    std::fprintf(f, ",%s", r.codec.c_str());
    for (double v : {r.byte_budget, r.bytes, r.error_bound}) csv_number(f, v);
    std::fputc('\n', f);
  }
  return std::fclose(f) == 0;
}

// ------------------------------------------------------------------ checks

struct checker {
  int failures = 0;
#if defined(__GNUC__)
  __attribute__((format(printf, 2, 3)))
#endif
  void
  fail(const char* fmt, ...) {
    ++failures;
    if (failures > 40) return;
    std::va_list args;
    va_start(args, fmt);
    std::fprintf(stderr, "check failed: ");
    std::vfprintf(stderr, fmt, args);
    std::fprintf(stderr, "\n");
    va_end(args);
  }
};

constexpr double check_tol = 1e-6;

// A metric is not finite or out of range (fractions outside [0, 1], a negative error).
bool out_of_range(const result_row& r) {
  const double unit[] = {r.kept, r.mass_kept, r.recall, r.needle_kept, r.needle_hit};
  bool bad = !(std::isfinite(r.rel_error) && r.rel_error >= 0.0);
  for (double v : unit) bad = bad || (!std::isnan(v) && !(v >= -check_tol && v <= 1.0 + check_tol));
  return bad;
}

// Properties of the policy rows that hold whatever the data: see README.md, "Sanity checks".
void check_rows(const std::vector<result_row>& rows, const quality::reference_info& info, checker& c) {
  constexpr double tol = check_tol;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const result_row& r = rows[i];
    if (r.codec_row()) continue;
    const std::string name = r.policy();
    const char* p = name.c_str();
    if (!r.error.empty()) {
      // Once per policy: rows come in (policy, ratio) order.
      if (i == 0 || rows[i - 1].policy() != name || rows[i - 1].error.empty())
        c.fail("%s: %s could not compress: %s", r.suite.c_str(), p, r.error.c_str());
      continue;
    }
    if (out_of_range(r)) c.fail("%s: %s at ratio %g: a metric is out of range", r.suite.c_str(), p, r.ratio);
    if (r.ratio == 0.0) {
      if (r.rel_error > tol || r.mass_kept < 1.0 - tol || r.recall < 1.0 - tol || r.kept < 1.0)
        c.fail("%s: %s at ratio 0 changed the cache: kept %.6f, error %.3g, mass %.9f, recall %.6f", r.suite.c_str(), p,
               r.kept, r.rel_error, r.mass_kept, r.recall);
      if (!std::isnan(info.needle_hit) && std::fabs(r.needle_hit - info.needle_hit) > tol)
        c.fail("%s: %s at ratio 0 finds %.3f of the needles, the full cache %.3f", r.suite.c_str(), p, r.needle_hit,
               info.needle_hit);
    }
  }
  // The oracle keeps, per stream, the tokens with the most held-out attention, so no
  // policy that keeps as many tokens in every stream can keep more attention mass.
  for (const result_row& o : rows) {
    if (o.scorer != "oracle" || !o.error.empty() || o.codec_row()) continue;
    for (const result_row& r : rows)
      if (!r.codec_row() && r.suite == o.suite && r.budget == o.budget && r.ratio == o.ratio && r.error.empty() &&
          r.stream_tokens == o.stream_tokens && r.mass_kept > o.mass_kept + tol)
        c.fail("%s: %s keeps attention mass %.9f > oracle/%s %.9f at ratio %g with the same stream sizes",
               r.suite.c_str(), r.policy().c_str(), r.mass_kept, o.budget.c_str(), o.mass_kept, r.ratio);
  }
  if (!std::isnan(info.needle_hit) && info.needle_hit < 0.9)
    c.fail("%s: the full cache finds only %.3f of the needles", rows.empty() ? "?" : rows[0].suite.c_str(),
           info.needle_hit);
}

// Properties of the codec rows: see README.md, "Sanity checks".
void check_codec_rows(const std::vector<result_row>& rows, checker& c) {
  for (const result_row& r : rows) {
    if (!r.codec_row()) continue;
    const std::string name = r.policy();
    const char *s = r.suite.c_str(), *p = name.c_str();
    if (!r.error.empty()) {
      c.fail("%s: %s at byte budget %g could not compress: %s", s, p, r.byte_budget, r.error.c_str());
      continue;
    }
    if (out_of_range(r)) c.fail("%s: %s at byte budget %g: a metric is out of range", s, p, r.byte_budget);
    // Equal bytes: never over the budget; an evicting row within a page of it (where
    // byte_cap stops), a codec alone with every token.
    if (!(r.bytes <= r.byte_budget))
      c.fail("%s: %s holds %.6f of the f16 bytes, over its budget %.6f", s, p, r.bytes, r.byte_budget);
    if (r.evicts() && !(r.byte_budget - r.bytes < r.page_bytes))
      c.fail("%s: %s holds %.6f of the f16 bytes, more than a page (%.6f) under its budget %.6f", s, p, r.bytes,
             r.page_bytes, r.byte_budget);
    if (!r.evicts()) {
      if (r.kept < 1.0 || r.mass_kept < 1.0 - check_tol || (!std::isnan(r.needle_kept) && r.needle_kept < 1.0))
        c.fail("%s: %s lost tokens: kept %.6f, mass %.9f, needles %.3f", s, p, r.kept, r.mass_kept, r.needle_kept);
      // The bound says something below 1 (f16 and 8 bits on the synthetic suites).
      if (r.error_bound < 1.0 && !(r.rel_error <= r.error_bound))
        c.fail("%s: %s has error %.6g, above its bound %.6g", s, p, r.rel_error, r.error_bound);
    }
  }
  // Codecs alone: more bytes, less error.
  for (const result_row& a : rows)
    for (const result_row& b : rows)
      if (a.codec_row() && b.codec_row() && !a.evicts() && !b.evicts() && a.error.empty() && b.error.empty() &&
          a.suite == b.suite && a.codec != b.codec && a.bytes > b.bytes && !(a.rel_error < b.rel_error))
        c.fail("%s: %s (bytes %.3f) has error %.6g, %s (bytes %.3f) %.6g", a.suite.c_str(), a.policy().c_str(), a.bytes,
               a.rel_error, b.policy().c_str(), b.bytes, b.rel_error);
}

// What --expect matches a row on: its suite, codec, scorer, budget, and its ratio (policy
// rows) or byte budget (codec rows).
using expect_key = std::tuple<std::string, std::string, std::string, std::string, std::string>;

std::string expect_at(bool codec_row, double ratio_or_budget) {
  char at[48];
  std::snprintf(at, sizeof at, codec_row ? "byte budget %g" : "ratio %g", ratio_or_budget);
  return at;
}

// A CSV cell as a number; empty (no value) is NaN.
double cell_number(const std::string& s) { return s.empty() ? std::nan("") : std::strtod(s.c_str(), nullptr); }

// Rows of an earlier CSV: expect_key -> rel_error, mass_kept, recall.
void check_expected(const std::string& path, const std::vector<result_row>& rows, checker& c) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) die("--expect: cannot open %s", path.c_str());
  std::map<expect_key, std::vector<double>> expected;
  std::vector<std::string> header;
  char line[4096];
  while (std::fgets(line, sizeof line, f) != nullptr) {
    std::string s(line);
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    std::vector<std::string> cells;
    std::size_t start = 0;
    for (;;) {
      const std::size_t end = s.find(',', start);
      cells.push_back(s.substr(start, end == std::string::npos ? std::string::npos : end - start));
      if (end == std::string::npos) break;
      start = end + 1;
    }
    if (header.empty()) {
      header = cells;
      continue;
    }
    std::map<std::string, std::string> cell;
    for (std::size_t i = 0; i < header.size() && i < cells.size(); ++i) cell[header[i]] = cells[i];
    // CSVs without the codec columns hold policy rows, on f32 pages.
    const bool codec_row = !cell["byte_budget"].empty();
    const std::string codec = cell["codec"].empty() ? "f32" : cell["codec"];
    const std::string at = expect_at(codec_row, cell_number(cell[codec_row ? "byte_budget" : "ratio"]));
    expected[{cell["suite"], codec, cell["scorer"], cell["budget"], at}] = {
        cell_number(cell["rel_error"]), cell_number(cell["mass_kept"]), cell_number(cell["recall"])};
  }
  std::fclose(f);
  int matched = 0;
  for (const result_row& r : rows) {
    const std::string at = expect_at(r.codec_row(), r.codec_row() ? r.byte_budget : r.ratio);
    const auto it = expected.find({r.suite, r.codec, r.scorer, r.budget, at});
    if (it == expected.end()) {
      c.fail("--expect: %s has no row for %s / %s at %s", path.c_str(), r.suite.c_str(), r.policy().c_str(),
             at.c_str());
      continue;
    }
    ++matched;
    const double got[3] = {r.rel_error, r.mass_kept, r.recall};
    const char* names[3] = {"rel_error", "mass_kept", "recall"};
    for (int i = 0; i < 3; ++i) {
      const double want = it->second[static_cast<std::size_t>(i)];
      if (std::isnan(got[i]) && std::isnan(want)) continue;  // no value on either side
      if (!(std::fabs(got[i] - want) <= 1e-7 + 1e-6 * std::fabs(want)))
        c.fail("--expect: %s %s at %s: %s %.9g, expected %.9g", r.suite.c_str(), r.policy().c_str(), at.c_str(),
               names[i], got[i], want);
    }
  }
  std::printf("\n--expect: %d rows match %s\n", matched, path.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const options opt = parse(argc, argv);

  std::vector<quality::policy> policies;
  for (quality::policy& p : quality::all_policies())
    if (opt.policy_rows && (opt.scorers.empty() || contains(opt.scorers, p.scorer)) &&
        (opt.budgets.empty() || contains(opt.budgets, p.budget)))
      policies.push_back(std::move(p));
  for (const std::vector<std::string>* filter : {&opt.scorers, &opt.budgets})
    for (const std::string& name : *filter) {
      bool found = false;
      for (const quality::policy& p : quality::all_policies()) found = found || p.scorer == name || p.budget == name;
      if (!found) die("no scorer or budget named '%s' (--list shows them)", name.c_str());
    }
  for (const std::string& name : opt.eval.mix_scorers) {
    bool found = false;
    for (const quality::policy& p : quality::all_policies()) found = found || p.scorer == name;
    if (!found) die("--mix-scorers: no scorer named '%s' (--list shows them)", name.c_str());
  }
  if (opt.list) {
    for (const quality::policy& p : policies) std::printf("%s\n", p.name().c_str());
    return 0;
  }
  for (const std::string& m : opt.metrics)
    if (metric_title(m) == nullptr) die("--metrics: unknown metric '%s'", m.c_str());

  // The workloads: one dump, or the synthetic suites.
  std::vector<std::string> suites;
  if (opt.npy_dir.empty()) {
    const std::vector<std::string> asked = opt.suites.empty() ? std::vector<std::string>{"all"} : opt.suites;
    for (const quality::suite_def& s : quality::synthetic_suites)
      if (contains(asked, "all") || contains(asked, s.name)) suites.push_back(s.name);
    for (const std::string& a : asked) {
      bool known = a == "all";
      for (const quality::suite_def& s : quality::synthetic_suites) known = known || a == s.name;
      if (!known) die("--suite: no suite named '%s' (local, diffuse, needle, blind, mixed, all)", a.c_str());
    }
  } else {
    suites.push_back(opt.npy_dir);
  }

  std::vector<result_row> all;
  checker c;
  for (const std::string& suite : suites) {
    quality::workload w;
    if (opt.npy_dir.empty()) {
      for (const quality::suite_def& s : quality::synthetic_suites)
        if (suite == s.name) w = quality::make_suite(s, opt.synth);
      if (!opt.write_npy.empty()) {
        const std::string dir = opt.write_npy + "/" + w.name;
        std::error_code ec;
        std::filesystem::create_directories(dir, ec);
        if (ec) die("--write-npy: cannot create %s: %s", dir.c_str(), ec.message().c_str());
        const kvc::status st = quality::save_dump(w, dir);
        if (!st.ok()) die("%s", st.message());
      }
    } else {
      const kvc::status st = quality::load_dump(opt.npy_dir, opt.max_layers, w);
      if (!st.ok()) die("%s", st.message());
      std::string name = opt.name;
      if (name.empty()) {
        std::string d = opt.npy_dir;
        while (d.size() > 1 && d.back() == '/') d.pop_back();
        name = d.substr(d.find_last_of('/') == std::string::npos ? 0 : d.find_last_of('/') + 1);
      }
      w.name = name;
      w.description = "dump " + opt.npy_dir;
      w.rope = opt.synth.rope;
      const int t = w.tokens;
      const int heldout = opt.have_context ? std::min(opt.synth.heldout, t - opt.synth.context) : opt.synth.heldout;
      w.context = opt.have_context ? opt.synth.context : t - heldout;
      if (w.context < 1 || heldout < 1 || w.context + heldout > t)
        die("the dump has %d tokens: too few for --context %d and --heldout %d", t, w.context, heldout);
      w.tokens = w.context + heldout;
      w.window = std::min(opt.synth.window, w.context);
      if (w.rope.dims(w.shape.head_dim) > w.shape.head_dim)
        die("--rotary-dims %d exceeds head_dim %d", opt.synth.rope.rotary_dims, w.shape.head_dim);
    }

    quality::evaluation e(w, opt.eval);
    std::vector<result_row> rows;
    quality::reference_info info;
    const kvc::status st = e.run(policies, rows, info);
    if (!st.ok()) die("%s", st.message());
    std::size_t codec_rows = 0;
    for (const result_row& r : rows) codec_rows += r.codec_row() ? 1 : 0;
    print_header(w, info, policies.size(), opt.eval.ratios.size(), codec_rows);
    print_failures(rows);
    print_tables(rows, opt.metrics, opt.eval.ratios);
    if (!opt.metrics.empty()) print_codec_table(rows);
    if (opt.check) {
      check_rows(rows, info, c);
      check_codec_rows(rows, c);
    }
    all.insert(all.end(), rows.begin(), rows.end());
    std::fflush(stdout);
  }

  if (!opt.csv.empty()) {
    if (!write_csv(opt.csv, all)) die("--csv: cannot write %s", opt.csv.c_str());
    std::printf("\nwrote %s\n", opt.csv.c_str());
  }
  if (!opt.expect.empty()) check_expected(opt.expect, all, c);

  // A policy that failed (its compress returned an error) has no numbers: say which, on
  // stderr too, and exit with status 1 even without --check.
  std::vector<std::string> failed;
  for (const result_row& r : all)
    if (!r.error.empty()) {
      const std::string line = r.suite + ": " + r.policy() + ": " + r.error;
      if (!contains(failed, line)) failed.push_back(line);
    }
  if (!failed.empty()) {
    std::fprintf(stderr, "kvc_quality: compress failed, so these results are missing:\n");
    for (const std::string& f : failed) std::fprintf(stderr, "  %s\n", f.c_str());
  }
  if (opt.check || !opt.expect.empty()) {
    if (c.failures > 0) {
      std::fprintf(stderr, "kvc_quality: %d check(s) failed\n", c.failures);
      return 1;
    }
    std::printf("\nall checks passed\n");
  }
  return failed.empty() ? 0 : 1;
}

// Tests of kvc/io/npy.hpp. Every file here is built byte by byte (magic, version, header
// length, header text, data) rather than written by the code under test, so the reader is
// checked against the format itself; the writer is then checked against the exact bytes
// numpy.save produces and by a round trip through the reader.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <kvc/io/npy.hpp>

namespace {

using bytes = std::vector<unsigned char>;

// A .npy file: magic, version major.0, header length (2 bytes for 1.0, 4 otherwise), the
// header padded with spaces so that the data starts at a multiple of 64, '\n', then data.
bytes npy_file(int major, std::string header, const bytes& data, int minor = 0) {
  bytes out = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<unsigned char>(major), static_cast<unsigned char>(minor)};
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  const std::size_t prefix = 8 + len_bytes;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  for (std::size_t i = 0; i < len_bytes; ++i) out.push_back(static_cast<unsigned char>(header.size() >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

bytes f32_bytes(const std::vector<float>& v) {
  bytes out;
  for (float x : v) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    for (int j = 0; j < 4; ++j) out.push_back(static_cast<unsigned char>(u >> (8 * j)));
  }
  return out;
}

bytes f64_bytes(const std::vector<double>& v) {
  bytes out;
  for (double x : v) {
    std::uint64_t u;
    std::memcpy(&u, &x, 8);
    for (int j = 0; j < 8; ++j) out.push_back(static_cast<unsigned char>(u >> (8 * j)));
  }
  return out;
}

bytes u16_bytes(const std::vector<std::uint16_t>& v) {
  bytes out;
  for (std::uint16_t x : v) {
    out.push_back(static_cast<unsigned char>(x));
    out.push_back(static_cast<unsigned char>(x >> 8));
  }
  return out;
}

kvc::result<kvc::io::npy_array> parse(const bytes& b) { return kvc::io::parse_npy(b.data(), b.size(), "test.npy"); }

std::string temp_path(const char* name) { return ::testing::TempDir() + "kvc_test_npy_" + name; }

void write_file(const std::string& path, const bytes& b) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(std::fwrite(b.data(), 1, b.size(), f), b.size());
  ASSERT_EQ(std::fclose(f), 0);
}

// The error's code, and that its message contains `part` and ends with the file name.
void expect_error(const bytes& b, kvc::status_code code, const char* part) {
  const auto r = parse(b);
  ASSERT_FALSE(r.ok()) << "expected an error containing '" << part << "'";
  EXPECT_EQ(r.status().code(), code) << r.status().message();
  const std::string msg = r.status().message();
  EXPECT_NE(msg.find(part), std::string::npos) << msg;
  EXPECT_EQ(msg.substr(msg.size() - 8), "test.npy") << msg;
}

const std::vector<float> six = {0.0f, 1.5f, -2.25f, 3e-8f, 1e30f, -0.0f};

}  // namespace

TEST(Npy, ReadsVersion1Float32) {
  const auto r = parse(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", f32_bytes(six)));
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(r->rank(), 2);
  EXPECT_EQ(r->shape_string(), "(2, 3)");
  ASSERT_EQ(r->data.size(), 6u);
  for (std::size_t i = 0; i < 6; ++i) EXPECT_EQ(std::memcmp(&r->data[i], &six[i], 4), 0) << i;  // bit for bit
}

TEST(Npy, ReadsVersions2And3AnyKeyOrderAndQuotes) {
  // Keys in another order, double quotes, no trailing comma, extra spaces: all valid Python.
  const std::string header = "{ \"shape\" : (3, 1, 2), \"fortran_order\":False,'descr':'<f4' }";
  for (int major : {2, 3}) {
    const auto r = parse(npy_file(major, header, f32_bytes(six)));
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_EQ(r->shape, (std::vector<std::int64_t>{3, 1, 2}));
    EXPECT_EQ(r->data[2], -2.25f);
  }
}

TEST(Npy, ShapesOfRankZeroOneAndEmpty) {
  auto r = parse(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", f32_bytes({7.0f})));
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->rank(), 0);
  ASSERT_EQ(r->size(), 1);
  EXPECT_EQ(r->data[0], 7.0f);
  EXPECT_EQ(r->shape_string(), "()");

  r = parse(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", f32_bytes({1, 2, 3, 4})));
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->shape, (std::vector<std::int64_t>{4}));
  EXPECT_EQ(r->shape_string(), "(4,)");
  EXPECT_EQ(r->data[3], 4.0f);

  r = parse(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 8), }", {}));
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->shape, (std::vector<std::int64_t>{0, 8}));
  EXPECT_EQ(r->size(), 0);
}

TEST(Npy, ConvertsFloat16AndFloat64) {
  // binary16: 1, -2, 0.5, 65504 (largest), 2^-24 (smallest subnormal), -inf.
  const auto h = parse(npy_file(1, "{'descr': '<f2', 'fortran_order': False, 'shape': (6,), }",
                                u16_bytes({0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0xFC00})));
  ASSERT_TRUE(h.ok()) << h.status().message();
  EXPECT_EQ(h->data, (std::vector<float>{1.0f, -2.0f, 0.5f, 65504.0f, 5.9604644775390625e-08f, -INFINITY}));

  const auto d =
      parse(npy_file(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 3), }", f64_bytes({0.1, -1e300, 3.0})));
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_EQ(d->data[0], 0.1f);  // rounded to nearest
  EXPECT_EQ(d->data[1], -INFINITY);
  EXPECT_EQ(d->data[2], 3.0f);
}

TEST(Npy, FortranOrderOfOneDimensionIsTheSameLayout) {
  const auto r = parse(npy_file(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", f32_bytes({1, 2})));
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->data, (std::vector<float>{1, 2}));
}

TEST(Npy, BadMagic) {
  bytes b = npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", f32_bytes({1}));
  b[1] = 'X';
  expect_error(b, kvc::status_code::invalid_argument, "bad magic");
  expect_error(bytes{0x93, 'N', 'U'}, kvc::status_code::invalid_argument, "bad magic");
  expect_error(bytes{}, kvc::status_code::invalid_argument, "bad magic");
}

TEST(Npy, UnsupportedVersion) {
  expect_error(npy_file(4, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", f32_bytes({1})),
               kvc::status_code::unsupported, "version 4.0");
  expect_error(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", f32_bytes({1}), 1),
               kvc::status_code::unsupported, "version 1.1");
}

TEST(Npy, UnsupportedDtypes) {
  expect_error(npy_file(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }", f32_bytes({1})),
               kvc::status_code::unsupported, "dtype '<i4' unsupported");
  expect_error(npy_file(1, "{'descr': '|u1', 'fortran_order': False, 'shape': (4,), }", f32_bytes({1})),
               kvc::status_code::unsupported, "dtype '|u1' unsupported");
  expect_error(npy_file(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", f32_bytes({1})),
               kvc::status_code::unsupported, "big-endian");
  expect_error(npy_file(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", f32_bytes({1})),
               kvc::status_code::unsupported, "structured dtype");
}

TEST(Npy, FortranOrder) {
  expect_error(npy_file(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", f32_bytes(six)),
               kvc::status_code::unsupported, "Fortran order");
}

TEST(Npy, TruncatedAndTrailingData) {
  bytes b = npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", f32_bytes(six));
  b.pop_back();
  expect_error(b, kvc::status_code::invalid_argument, "truncated data (24 bytes for shape (2, 3), 23 present)");
  b.push_back(0);
  b.push_back(0);
  expect_error(b, kvc::status_code::invalid_argument, "1 extra bytes after the data");
}

TEST(Npy, TruncatedHeader) {
  const bytes b = npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", f32_bytes({1}));
  expect_error(bytes(b.begin(), b.begin() + 40), kvc::status_code::invalid_argument, "truncated header");
  expect_error(bytes(b.begin(), b.begin() + 9), kvc::status_code::invalid_argument, "truncated header");
}

TEST(Npy, MalformedHeaders) {
  expect_error(npy_file(1, "['descr', '<f4']", {}), kvc::status_code::invalid_argument, "not a dict");
  expect_error(npy_file(1, "{'descr': '<f4', 'fortran_order': False, }", {}), kvc::status_code::invalid_argument,
               "lacks 'shape'");
  expect_error(npy_file(1, "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,), }", f32_bytes({1})),
               kvc::status_code::invalid_argument, "value of 'fortran_order'");
  expect_error(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, -2), }", f32_bytes({1})),
               kvc::status_code::invalid_argument, "value of 'shape'");
  expect_error(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}", f32_bytes({1})),
               kvc::status_code::invalid_argument, "unexpected header key 'x'");
  expect_error(npy_file(1, "{'descr': '<f4' 'fortran_order': False, 'shape': (1,), }", f32_bytes({1})),
               kvc::status_code::invalid_argument, "malformed header dict");
  expect_error(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), } x", f32_bytes({1})),
               kvc::status_code::invalid_argument, "text after the header");
}

TEST(Npy, WriterMatchesNumpySave) {
  // The first 128 bytes numpy.save writes for np.arange(6, dtype='<f4').reshape(2, 3).
  const std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  const std::vector<float> data = {0, 1, 2, 3, 4, 5};
  const std::int64_t shape[2] = {2, 3};
  const bytes written = kvc::io::format_npy(data.data(), shape, 2);
  EXPECT_EQ(written, npy_file(1, header, f32_bytes(data)));
  ASSERT_EQ(written.size(), 128u + 24u);
  EXPECT_EQ(written[8], 118);  // header length, as numpy writes it
  EXPECT_EQ(written[127], '\n');
}

TEST(Npy, FileRoundTrip) {
  const std::string path = temp_path("roundtrip.npy");
  std::vector<float> data(3 * 2 * 5);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i) * 0.25f - 3.0f;
  const std::int64_t shape[3] = {3, 2, 5};
  const kvc::status w = kvc::io::write_npy(path.c_str(), data.data(), shape, 3);
  ASSERT_TRUE(w.ok()) << w.message();
  const auto r = kvc::io::read_npy(path.c_str());
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->shape, (std::vector<std::int64_t>{3, 2, 5}));
  EXPECT_EQ(r->data, data);
  std::remove(path.c_str());
}

TEST(Npy, CorruptFileOnDisk) {
  const std::string path = temp_path("corrupt.npy");
  bytes b = npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", f32_bytes(six));
  ASSERT_GT(b.size(), 5u);
  b.erase(b.end() - 5, b.end());  // the last 5 bytes of the data
  write_file(path, b);
  const auto r = kvc::io::read_npy(path.c_str());
  ASSERT_FALSE(r.ok());
  const std::string msg = r.status().message();
  EXPECT_NE(msg.find("truncated data"), std::string::npos) << msg;
  EXPECT_NE(msg.find("corrupt.npy"), std::string::npos) << msg;
  std::remove(path.c_str());
}

TEST(Npy, MissingFile) {
  const std::string path = temp_path("does_not_exist.npy");
  const auto r = kvc::io::read_npy(path.c_str());
  ASSERT_FALSE(r.ok());
  const std::string msg = r.status().message();
  EXPECT_NE(msg.find("cannot open"), std::string::npos) << msg;
  EXPECT_NE(msg.find("does_not_exist.npy"), std::string::npos) << msg;

  const std::int64_t shape[1] = {1};
  const float x = 1.0f;
  const kvc::status w = kvc::io::write_npy((path + "/no/such/dir.npy").c_str(), &x, shape, 1);
  EXPECT_FALSE(w.ok());
  EXPECT_NE(std::string(w.message()).find("cannot create"), std::string::npos) << w.message();
}

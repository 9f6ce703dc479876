// wsdeploy's ExecuTorch runner: what an app does with a .pte, with nothing but ExecuTorch's
// own runtime libraries (libexecutorch, its optimized/portable and quantized kernels, the
// XNNPACK delegate; no Python, no libtorch). wsdeploy builds it for this machine and for
// arm64 (zig c++) against the headers and libraries of ExecuTorch's wheel for that
// architecture, and runs it to verify and time a build on the emulated arm64 device.
//
//   executorch_runner MODEL.pte OUT_PREFIX WARMUP REPEAT [INPUT.bin[:D0xD1x...] ...]
//
// Each INPUT.bin holds one input's raw bytes, in the layout and type of the program's input
// (checked against its size), at the program's sizes or at the sizes after the colon (a
// program with dynamic dimensions takes any within the bounds it was planned for). Runs the
// first method WARMUP + REPEAT times; writes each tensor output's raw bytes to
// OUT_PREFIX-<i>.bin and prints one line of JSON on stdout:
//   {"outputs": [{"dtype": <ScalarType code>, "shape": [...]}, ...], "ms": [...]}
// (milliseconds of each timed run). Errors go to stderr as one line, exit status 1.
//
// Only ExecuTorch's C++ API of plain pointers and its own types crosses into its libraries:
// this file may be compiled with a C++ standard library other than theirs (zig's libc++).
// Inline code of their headers that touches a standard type the libraries built runs here
// with the other library: Program's destructor frees a std::variant (FreeableBuffer) whose
// layout differs between the two. So the program, its loader and its method are built in
// place on the heap (guaranteed elision: no move in this file) and never destroyed; the
// process ends with std::exit.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <executorch/extension/data_loader/file_data_loader.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/core/portable_type/tensor.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

using executorch::extension::FileDataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::MethodMeta;
using executorch::runtime::Program;
using executorch::runtime::Result;
using executorch::runtime::Span;
using executorch::runtime::TensorInfo;
using executorch::runtime::etensor::Tensor;
using executorch::runtime::etensor::TensorImpl;

namespace {

[[noreturn]] void fail(const char* what, const char* detail, unsigned code) {
  std::fprintf(stderr, "executorch_runner: %s%s%s (error 0x%x)\n", what, detail ? ": " : "",
               detail ? detail : "", code);
  std::exit(1);
}

uint8_t* pool(size_t bytes) {
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
  if (p == nullptr) fail("out of memory", nullptr, 0);
  return p;
}

size_t read_file(const char* path, void* dest, size_t expected) {
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) fail("cannot open input", path, 0);
  size_t got = std::fread(dest, 1, expected, f);
  char extra;
  bool more = std::fread(&extra, 1, 1, f) == 1;
  std::fclose(f);
  if (got != expected || more) fail("input size differs from the program's input", path, 0);
  return got;
}

double now_ms() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr,
                 "usage: executorch_runner MODEL.pte OUT_PREFIX WARMUP REPEAT [INPUT.bin ...]\n");
    return 2;
  }
  const char* model = argv[1];
  const char* prefix = argv[2];
  const long warmup = std::strtol(argv[3], nullptr, 10);
  const long repeat = std::strtol(argv[4], nullptr, 10);
  executorch::runtime::runtime_init();

  auto* loader = new Result<FileDataLoader>(FileDataLoader::from(model));
  if (!loader->ok()) fail("cannot read", model, static_cast<unsigned>(loader->error()));
  auto* program = new Result<Program>(Program::load(&loader->get()));
  if (!program->ok()) fail("not an ExecuTorch program", model, (unsigned)program->error());
  Result<const char*> name = (*program)->get_method_name(0);
  if (!name.ok()) fail("the program has no method", model, (unsigned)name.error());
  Result<MethodMeta> meta = (*program)->method_meta(*name);
  if (!meta.ok()) fail("no method metadata", *name, (unsigned)meta.error());

  // Planned buffers as the program asks; the method and temp allocators get generous pools
  // (XNNPACK keeps its packed weights in its own memory).
  const size_t n_planned = meta->num_memory_planned_buffers();
  auto* spans = new Span<uint8_t>[n_planned > 0 ? n_planned : 1];
  for (size_t i = 0; i < n_planned; ++i) {
    const size_t size = static_cast<size_t>(meta->memory_planned_buffer_size(i).get());
    spans[i] = Span<uint8_t>(pool(size), size);
  }
  auto* planned = new HierarchicalAllocator(Span<Span<uint8_t>>(spans, n_planned));
  const uint32_t method_pool = 64u << 20, temp_pool = 64u << 20;
  auto* method_allocator = new MemoryAllocator(method_pool, pool(method_pool));
  auto* temp_allocator = new MemoryAllocator(temp_pool, pool(temp_pool));
  auto* memory = new MemoryManager(method_allocator, planned, temp_allocator);
  auto* method = new Result<Method>((*program)->load_method(*name, memory));
  if (!method->ok()) fail("cannot load the method", *name, (unsigned)method->error());

  const size_t n_inputs = meta->num_inputs();
  if (static_cast<size_t>(argc - 5) != n_inputs) {
    std::fprintf(stderr, "executorch_runner: the program takes %zu inputs, %d were given\n",
                 n_inputs, argc - 5);
    return 1;
  }
  // Each input: the caller's bytes in a tensor of the program's type, sizes and dim order,
  // handed over with set_input (which copies it into planned memory) before every run.
  auto* inputs = new EValue[n_inputs > 0 ? n_inputs : 1];
  for (size_t i = 0; i < n_inputs; ++i) {
    Result<TensorInfo> info = meta->input_tensor_meta(i);
    if (!info.ok()) fail("a non-tensor input", argv[5 + i], (unsigned)info.error());
    const size_t dim = info->sizes().size();
    auto* sizes = new TensorImpl::SizesType[dim > 0 ? dim : 1];
    auto* order = new TensorImpl::DimOrderType[dim > 0 ? dim : 1];
    auto* strides = new TensorImpl::StridesType[dim > 0 ? dim : 1];
    size_t planned_numel = 1;
    for (size_t d = 0; d < dim; ++d) {
      sizes[d] = info->sizes()[d];
      order[d] = info->dim_order()[d];
      planned_numel *= static_cast<size_t>(sizes[d]);
    }
    const size_t element = planned_numel ? info->nbytes() / planned_numel : 0;
    char* path = argv[5 + i];
    char* colon = std::strrchr(path, ':');
    if (colon != nullptr && colon[1] != '\0' && std::strspn(colon + 1, "0123456789x") ==
                                                    std::strlen(colon + 1)) {
      *colon = '\0';  // PATH:D0xD1x...: this run's sizes
      size_t d = 0;
      for (char* at = colon + 1; *at != '\0'; ++d) {
        if (d >= dim) fail("more sizes than the input's dimensions", path, 0);
        char* end = nullptr;
        sizes[d] = static_cast<TensorImpl::SizesType>(std::strtol(at, &end, 10));
        at = (*end == 'x') ? end + 1 : end;
      }
      if (d != dim) fail("fewer sizes than the input's dimensions", path, 0);
    }
    size_t numel = 1;
    for (size_t d = 0; d < dim; ++d) numel *= static_cast<size_t>(sizes[d]);
    int32_t stride = 1;  // contiguous in dim order: the last dimension in it varies fastest
    for (size_t d = dim; d-- > 0;) {
      strides[order[d]] = stride;
      stride *= sizes[order[d]];
    }
    void* data = pool(numel * element);
    read_file(path, data, numel * element);
    auto* impl = new TensorImpl(info->scalar_type(), static_cast<ssize_t>(dim), sizes, data,
                                order, strides);
    inputs[i] = EValue(Tensor(impl));
  }
  auto* ms = new double[repeat > 0 ? repeat : 1];
  for (long run = 0; run < warmup + repeat; ++run) {
    for (size_t i = 0; i < n_inputs; ++i) {
      const Error set = (*method)->set_input(inputs[i], i);
      if (set != Error::Ok) fail("the program refused an input", argv[5 + i], (unsigned)set);
    }
    const double start = now_ms();
    const Error status = (*method)->execute();
    const double stop = now_ms();
    if (status != Error::Ok) fail("execution failed", *name, static_cast<unsigned>(status));
    if (run >= warmup) ms[run - warmup] = stop - start;
  }

  std::printf("{\"outputs\": [");
  const size_t n_outputs = (*method)->outputs_size();
  for (size_t i = 0; i < n_outputs; ++i) {
    const EValue& output = (*method)->get_output(i);
    if (!output.isTensor()) fail("a non-tensor output", *name, 0);
    const auto tensor = output.toTensor();
    char path[4096];
    std::snprintf(path, sizeof path, "%s-%zu.bin", prefix, i);
    FILE* f = std::fopen(path, "wb");
    if (f == nullptr) fail("cannot write", path, 0);
    const size_t n = tensor.nbytes();
    if (std::fwrite(tensor.const_data_ptr(), 1, n, f) != n || std::fclose(f) != 0) {
      fail("cannot write", path, 0);
    }
    std::printf("%s{\"dtype\": %d, \"shape\": [", i ? ", " : "",
                static_cast<int>(tensor.scalar_type()));
    for (ssize_t d = 0; d < tensor.dim(); ++d) {
      std::printf("%s%d", d ? ", " : "", static_cast<int>(tensor.size(d)));
    }
    std::printf("]}");
  }
  std::printf("], \"ms\": [");
  for (long r = 0; r < repeat; ++r) std::printf("%s%.6f", r ? ", " : "", ms[r]);
  std::printf("]}\n");
  std::fflush(stdout);
  std::exit(0);  // not a return: nothing above is destroyed (see the top of this file)
}

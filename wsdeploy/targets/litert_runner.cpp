// wsdeploy's LiteRT runner: what an app does with a .tflite through LiteRT's C API (an
// environment, the model, a compiled model on the CPU accelerator, i.e. XNNPACK, managed
// tensor buffers), with nothing but libLiteRt.so from ai-edge-litert's wheel (no Python, no
// headers: the wheel ships none, so the few declarations used are copied below). wsdeploy
// builds it for this machine and for arm64 (zig c++) against that library for each
// architecture, and runs it to verify and time a build on the emulated arm64 device.
//
//   litert_runner MODEL.tflite OUT_PREFIX WARMUP REPEAT [INPUT.bin[:D0xD1x...] ...]
//
// Each INPUT.bin holds one input's raw bytes (little-endian, the model's element type, row
// major), in the order of the inputs of the model's first signature, at the model's sizes or
// at the sizes after the colon (a static model takes only its own; a dynamic dimension, one
// below 0 in the model, takes any size the model accepts). Runs the first signature WARMUP +
// REPEAT times (each timed run: LiteRtRunCompiledModel alone, the inputs already in their
// buffers); writes each output's raw bytes to OUT_PREFIX-<i>.bin and prints one line of JSON
// on stdout:
//   {"outputs": [{"dtype": <code>, "shape": [...]}, ...], "ms": [...]}
// (dtype: ExecuTorch's ScalarType code, as every wsdeploy runner writes; ms: milliseconds of
// each timed run). Errors go to stderr as one line starting "litert_runner: ", exit status 1.
//
// Threads: WSDEPLOY_THREADS=N, if set, is passed as the CPU options' num_threads (the
// "xnnpack" opaque options, as LrtSetCpuOptionsNumThread serialises them); unset, LiteRT's
// default holds: no CPU options, XNNPACK without a thread pool, one thread.
//
// Only LiteRT's C API crosses into the library, so any C++ standard library builds this
// file. Nothing is destroyed: the process ends with std::exit.
//
// Under qemu-user, the aarch64 library's cpuinfo (which XNNPACK starts with) reads
// /proc/cpuinfo through qemu's -L root, else the host's: an x86 host's (no "CPU part"
// lines) crashes it (SIGSEGV at the compile or the environment); an ARM one in
// <root>/proc/cpuinfo runs.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// ---------------------------------------------------------------------------------------
// LiteRT C API declarations, copied from the headers of google-ai-edge/LiteRT (Apache-2.0,
// Copyright 2024 Google LLC), at commit f67457790c9c2ab67347d6fe53270e8d3df20868 (main,
// 2026-08-21), the newest source found; ai-edge-litert 2.3.0 (built 2026-10-06) has no tag
// there. Every declaration below is identical at tag v2.2.0 and at that commit, and the
// structs are the ones the headers mark "part of the public API and ABI stable". Only what
// this file uses, in the headers' order.
// ---------------------------------------------------------------------------------------
extern "C" {

// litert/c/litert_common.h
typedef class LiteRtCompiledModelT* LiteRtCompiledModel;
typedef class LiteRtEnvironmentT* LiteRtEnvironment;
typedef class LiteRtTensorT* LiteRtTensor;
typedef class LiteRtSignatureT* LiteRtSignature;
typedef class LiteRtModelT* LiteRtModel;
typedef class LiteRtOpaqueOptionsT* LiteRtOpaqueOptions;
typedef struct LiteRtOptionsT* LiteRtOptions;
typedef class LiteRtTensorBufferT* LiteRtTensorBuffer;
typedef class LiteRtTensorBufferRequirementsT* LiteRtTensorBufferRequirements;

typedef enum {
  kLiteRtStatusOk = 0,
  kLiteRtStatusErrorInvalidArgument = 1,
  kLiteRtStatusErrorMemoryAllocationFailure = 2,
  kLiteRtStatusErrorRuntimeFailure = 3,
  kLiteRtStatusErrorMissingInputTensor = 4,
  kLiteRtStatusErrorUnsupported = 5,
  kLiteRtStatusErrorNotFound = 6,
  kLiteRtStatusErrorTimeoutExpired = 7,
  kLiteRtStatusErrorWrongVersion = 8,
  kLiteRtStatusErrorUnknown = 9,
  kLiteRtStatusErrorAlreadyExists = 10,
  kLiteRtStatusCancelled = 100,
  kLiteRtStatusErrorFileIO = 500,
  kLiteRtStatusErrorInvalidFlatbuffer = 501,
  kLiteRtStatusErrorDynamicLoading = 502,
  kLiteRtStatusErrorSerialization = 503,
  kLiteRtStatusErrorCompilation = 504,
  kLiteRtStatusErrorIndexOOB = 1000,
  kLiteRtStatusErrorInvalidIrType = 1001,
  kLiteRtStatusErrorInvalidGraphInvariant = 1002,
  kLiteRtStatusErrorGraphModification = 1003,
  kLiteRtStatusErrorInvalidToolConfig = 1500,
  kLiteRtStatusLegalizeNoMatch = 2000,
  kLiteRtStatusErrorInvalidLegalization = 2001,
  kLiteRtStatusPatternNoMatch = 3000,
  kLiteRtStatusInvalidTransformation = 3001,
  kLiteRtStatusErrorUnsupportedRuntimeVersion = 4000,
  kLiteRtStatusErrorUnsupportedCompilerVersion = 4001,
  kLiteRtStatusErrorIncompatibleByteCodeVersion = 4002,
  kLiteRtStatusErrorUnsupportedOpShapeInferer = 5000,
  kLiteRtStatusErrorShapeInferenceFailed = 5001,
} LiteRtStatus;

typedef enum LiteRtHwAccelerators {
  kLiteRtHwAcceleratorNone = 0,
  kLiteRtHwAcceleratorCpu = 1 << 0,
  kLiteRtHwAcceleratorGpu = 1 << 1,
  kLiteRtHwAcceleratorNpu = 1 << 2,
  _kLiteRtHwAcceleratorNegativeDummy = -1,
} LiteRtHwAccelerators;

typedef enum {
  kLiteRtTensorBufferLockModeRead = 0,
  kLiteRtTensorBufferLockModeWrite = 1,
  kLiteRtTensorBufferLockModeReadWrite = 2,
} LiteRtTensorBufferLockMode;

typedef int LiteRtHwAcceleratorSet;
typedef size_t LiteRtParamIndex;

// litert/c/litert_any.h
typedef enum {
  kLiteRtAnyTypeNone = 0,
  kLiteRtAnyTypeBool = 1,
  kLiteRtAnyTypeInt = 2,
  kLiteRtAnyTypeReal = 3,
  kLiteRtAnyTypeString = 8,
  kLiteRtAnyTypeVoidPtr = 9,
} LiteRtAnyType;

typedef struct {
  LiteRtAnyType type;
  union {
    bool bool_value;
    int64_t int_value;
    double real_value;
    const char* str_value;
    const void* ptr_value;
  };
} LiteRtAny;

// litert/c/litert_environment_options.h (the one tag used)
typedef enum {
  // Bitmask of LiteRtHwAccelerators to auto-register when the environment is
  // created. If unset, LiteRT auto-registers all supported accelerators.
  kLiteRtEnvOptionTagAutoRegisterAccelerators = 24,
  kLiteRtEnvOptionTagNull = 255,
} LiteRtEnvOptionTag;

typedef struct {
  LiteRtEnvOptionTag tag;
  LiteRtAny value;
} LiteRtEnvOption;

// litert/c/litert_layout.h
#define LITERT_TENSOR_MAX_RANK 8

typedef struct {
  unsigned int rank : 7;  // The number of dimensions.
  unsigned int has_strides : 1;
  // Dimension sizes, array of length `rank`. Dynamic dimensions are anything
  // less than 0. Everything from [rank, LITERT_MAX_RANK) is undefined.
  int32_t dimensions[LITERT_TENSOR_MAX_RANK];
  // Strides. Used only if has_strides is true.
  uint32_t strides[LITERT_TENSOR_MAX_RANK];
} LiteRtLayout;

// litert/c/litert_model_types.h
typedef enum {
  kLiteRtElementTypeNone = 0,           // kTfLiteNoType,
  kLiteRtElementTypeBool = 6,           // kTfLiteBool,
  kLiteRtElementTypeInt2 = 20,          // kTfLiteInt2,
  kLiteRtElementTypeInt4 = 18,          // kTfLiteInt4,
  kLiteRtElementTypeInt8 = 9,           // kTfLiteInt8,
  kLiteRtElementTypeInt16 = 7,          // kTfLiteInt16,
  kLiteRtElementTypeInt32 = 2,          // kTfLiteInt32,
  kLiteRtElementTypeInt64 = 4,          // kTfLiteInt64,
  kLiteRtElementTypeUInt4 = 21,         // kTfLiteUInt4,
  kLiteRtElementTypeUInt8 = 3,          // kTfLiteUInt8,
  kLiteRtElementTypeUInt16 = 17,        // kTfLiteUInt16,
  kLiteRtElementTypeUInt32 = 16,        // kTfLiteUInt32,
  kLiteRtElementTypeUInt64 = 13,        // kTfLiteUInt64,
  kLiteRtElementTypeFloat8E4M3FN = 22,  // kTfLiteFloat8E4M3FN,
  kLiteRtElementTypeFloat8E5M2 = 23,    // kTfLiteFloat8E5M2,
  kLiteRtElementTypeFloat16 = 10,       // kTfLiteFloat16,
  kLiteRtElementTypeBFloat16 = 19,      // kTfLiteBFloat16,
  kLiteRtElementTypeFloat32 = 1,        // kTfLiteFloat32,
  kLiteRtElementTypeFloat64 = 11,       // kTfLiteFloat64,
  kLiteRtElementTypeComplex64 = 8,      // kTfLiteComplex64,
  kLiteRtElementTypeComplex128 = 12,    // kTfLiteComplex128,
  kLiteRtElementTypeTfResource = 14,    // kTfLiteResource,
  kLiteRtElementTypeTfString = 5,       // kTfLiteString,
  kLiteRtElementTypeTfVariant = 15,     // kTfLiteVariant,
} LiteRtElementType;

typedef struct {
  // The primitive element type of the constituent data.
  LiteRtElementType element_type;
  // Shape information.
  LiteRtLayout layout;
} LiteRtRankedTensorType;

typedef enum {
  // Type with fixed rank and possibly dynamic dimensions.
  kLiteRtRankedTensorType = 0,
  // Type with dynamic rank.
  kLiteRtUnrankedTensorType = 1,
} LiteRtTensorTypeId;

// litert/c/litert_environment.h
LiteRtStatus LiteRtCreateEnvironment(int num_options, const LiteRtEnvOption* options,
                                     LiteRtEnvironment* environment);

// litert/c/litert_model.h
LiteRtStatus LiteRtGetTensorTypeId(LiteRtTensor tensor, LiteRtTensorTypeId* type_id);
LiteRtStatus LiteRtGetRankedTensorType(LiteRtTensor tensor,
                                       LiteRtRankedTensorType* ranked_tensor_type);
LiteRtStatus LiteRtGetNumSignatureInputs(LiteRtSignature signature,
                                         LiteRtParamIndex* num_inputs);
LiteRtStatus LiteRtGetSignatureInputTensorByIndex(LiteRtSignature signature,
                                                  LiteRtParamIndex input_idx,
                                                  LiteRtTensor* tensor);
LiteRtStatus LiteRtGetNumSignatureOutputs(LiteRtSignature signature,
                                          LiteRtParamIndex* num_outputs);
LiteRtStatus LiteRtGetSignatureOutputTensorByIndex(LiteRtSignature signature,
                                                   LiteRtParamIndex output_idx,
                                                   LiteRtTensor* tensor);
LiteRtStatus LiteRtCreateModelFromFile(LiteRtEnvironment environment, const char* filename,
                                       LiteRtModel* model);
LiteRtStatus LiteRtGetNumModelSignatures(LiteRtModel model, LiteRtParamIndex* num_signatures);
LiteRtStatus LiteRtGetModelSignature(LiteRtModel model, LiteRtParamIndex signature_index,
                                     LiteRtSignature* signature);

// litert/c/litert_opaque_options.h
LiteRtStatus LiteRtCreateOpaqueOptions(const char* payload_identifier, void* payload_data,
                                       void (*payload_destructor)(void* payload_data),
                                       LiteRtOpaqueOptions* options);

// litert/c/litert_options.h
LiteRtStatus LiteRtCreateOptions(LiteRtOptions* options);
LiteRtStatus LiteRtSetOptionsHardwareAccelerators(LiteRtOptions options,
                                                  LiteRtHwAcceleratorSet hardware_accelerators);
LiteRtStatus LiteRtAddOpaqueOptions(LiteRtOptions options, LiteRtOpaqueOptions opaque_options);

// litert/c/litert_compiled_model.h
LiteRtStatus LiteRtCreateCompiledModel(LiteRtEnvironment environment, LiteRtModel model,
                                       LiteRtOptions compilation_options,
                                       LiteRtCompiledModel* compiled_model);
LiteRtStatus LiteRtGetCompiledModelInputBufferRequirements(
    LiteRtCompiledModel compiled_model, LiteRtParamIndex signature_index,
    LiteRtParamIndex input_index, LiteRtTensorBufferRequirements* buffer_requirements);
LiteRtStatus LiteRtGetCompiledModelOutputBufferRequirements(
    LiteRtCompiledModel compiled_model, LiteRtParamIndex signature_index,
    LiteRtParamIndex output_index, LiteRtTensorBufferRequirements* buffer_requirements);
LiteRtStatus LiteRtGetCompiledModelInputTensorLayout(LiteRtCompiledModel compiled_model,
                                                     LiteRtParamIndex signature_index,
                                                     LiteRtParamIndex input_index,
                                                     LiteRtLayout* layout);
LiteRtStatus LiteRtGetCompiledModelOutputTensorLayouts(LiteRtCompiledModel compiled_model,
                                                       LiteRtParamIndex signature_index,
                                                       size_t num_layouts, LiteRtLayout* layouts,
                                                       bool update_allocation);
LiteRtStatus LiteRtRunCompiledModel(LiteRtCompiledModel compiled_model,
                                    LiteRtParamIndex signature_index, size_t num_input_buffers,
                                    LiteRtTensorBuffer* input_buffers, size_t num_output_buffers,
                                    LiteRtTensorBuffer* output_buffers);
LiteRtStatus LiteRtCompiledModelResizeInputTensor(LiteRtCompiledModel compiled_model,
                                                  LiteRtParamIndex signature_index,
                                                  LiteRtParamIndex input_index, const int* dims,
                                                  size_t dims_size);

// litert/c/litert_tensor_buffer.h
LiteRtStatus LiteRtCreateManagedTensorBufferFromRequirements(
    LiteRtEnvironment env, const LiteRtRankedTensorType* tensor_type,
    LiteRtTensorBufferRequirements requirements, LiteRtTensorBuffer* buffer);
LiteRtStatus LiteRtGetTensorBufferTensorType(LiteRtTensorBuffer tensor_buffer,
                                             LiteRtRankedTensorType* tensor_type);
LiteRtStatus LiteRtGetTensorBufferPackedSize(LiteRtTensorBuffer tensor_buffer, size_t* size);
LiteRtStatus LiteRtLockTensorBuffer(LiteRtTensorBuffer tensor_buffer, void** host_mem_addr,
                                    LiteRtTensorBufferLockMode lock_mode);
LiteRtStatus LiteRtUnlockTensorBuffer(LiteRtTensorBuffer buffer);

}  // extern "C"

// The headers' own checks of the ABI-stable structs (LP64: x86_64 and aarch64).
static_assert(sizeof(LiteRtAny) == 16, "LiteRtAny size mismatch");
static_assert(sizeof(LiteRtEnvOption) == 24, "LiteRtEnvOption size mismatch");
static_assert(offsetof(LiteRtEnvOption, value) == 8, "LiteRtEnvOption value offset mismatch");
static_assert(sizeof(LiteRtLayout) == 68, "LiteRtLayout size mismatch");
static_assert(offsetof(LiteRtLayout, dimensions) == 4, "LiteRtLayout dimensions offset");
static_assert(offsetof(LiteRtLayout, strides) == 36, "LiteRtLayout strides offset");
static_assert(sizeof(LiteRtRankedTensorType) == 72, "LiteRtRankedTensorType size mismatch");
static_assert(offsetof(LiteRtRankedTensorType, layout) == 4, "LiteRtRankedTensorType layout");
static_assert(sizeof(LiteRtStatus) == 4 && sizeof(LiteRtElementType) == 4, "enums are ints");
// ---------------------------------------------------------------------------------------

namespace {

const char* status_name(LiteRtStatus status) {
  switch (status) {
    case kLiteRtStatusOk: return "Ok";
    case kLiteRtStatusErrorInvalidArgument: return "InvalidArgument";
    case kLiteRtStatusErrorMemoryAllocationFailure: return "MemoryAllocationFailure";
    case kLiteRtStatusErrorRuntimeFailure: return "RuntimeFailure";
    case kLiteRtStatusErrorMissingInputTensor: return "MissingInputTensor";
    case kLiteRtStatusErrorUnsupported: return "Unsupported";
    case kLiteRtStatusErrorNotFound: return "NotFound";
    case kLiteRtStatusErrorTimeoutExpired: return "TimeoutExpired";
    case kLiteRtStatusErrorWrongVersion: return "WrongVersion";
    case kLiteRtStatusErrorUnknown: return "Unknown";
    case kLiteRtStatusErrorAlreadyExists: return "AlreadyExists";
    case kLiteRtStatusCancelled: return "Cancelled";
    case kLiteRtStatusErrorFileIO: return "FileIO";
    case kLiteRtStatusErrorInvalidFlatbuffer: return "InvalidFlatbuffer";
    case kLiteRtStatusErrorDynamicLoading: return "DynamicLoading";
    case kLiteRtStatusErrorSerialization: return "Serialization";
    case kLiteRtStatusErrorCompilation: return "Compilation";
    case kLiteRtStatusErrorIndexOOB: return "IndexOOB";
    case kLiteRtStatusErrorUnsupportedOpShapeInferer: return "UnsupportedOpShapeInferer";
    case kLiteRtStatusErrorShapeInferenceFailed: return "ShapeInferenceFailed";
    default: return "error";
  }
}

// One line on stderr: "litert_runner: WHAT[: DETAIL][ (LiteRT status N, NAME)]".
[[noreturn]] void fail(const char* what, const char* detail = nullptr, int status = 0) {
  std::fprintf(stderr, "litert_runner: %s%s%s", what, detail ? ": " : "", detail ? detail : "");
  if (status != 0) {
    std::fprintf(stderr, " (LiteRT status %d, %s)", status,
                 status_name(static_cast<LiteRtStatus>(status)));
  }
  std::fprintf(stderr, "\n");
  std::exit(1);
}

void check(LiteRtStatus status, const char* what, const char* detail = nullptr) {
  if (status != kLiteRtStatusOk) fail(what, detail, status);
}

// The byte size of one element and its ExecuTorch ScalarType code (0 bytes: not a type this
// runner reads or writes: strings, resources, variants, sub-byte integers).
struct Dtype {
  size_t bytes;
  int code;
};

Dtype dtype(LiteRtElementType type) {
  switch (type) {
    case kLiteRtElementTypeUInt8: return {1, 0};
    case kLiteRtElementTypeInt8: return {1, 1};
    case kLiteRtElementTypeInt16: return {2, 2};
    case kLiteRtElementTypeInt32: return {4, 3};
    case kLiteRtElementTypeInt64: return {8, 4};
    case kLiteRtElementTypeFloat16: return {2, 5};
    case kLiteRtElementTypeFloat32: return {4, 6};
    case kLiteRtElementTypeFloat64: return {8, 7};
    case kLiteRtElementTypeComplex64: return {8, 9};
    case kLiteRtElementTypeComplex128: return {16, 10};
    case kLiteRtElementTypeBool: return {1, 11};
    case kLiteRtElementTypeBFloat16: return {2, 15};
    case kLiteRtElementTypeFloat8E5M2: return {1, 23};
    case kLiteRtElementTypeFloat8E4M3FN: return {1, 24};
    case kLiteRtElementTypeUInt16: return {2, 27};
    case kLiteRtElementTypeUInt32: return {4, 28};
    case kLiteRtElementTypeUInt64: return {8, 29};
    default: return {0, -1};
  }
}

// "AxBxC" of a layout's dimensions (a dynamic one: -1), in `out`.
const char* sizes(const LiteRtLayout& layout, char* out, size_t n) {
  size_t at = 0;
  out[0] = '\0';
  for (unsigned d = 0; d < layout.rank && at < n; ++d) {
    at += std::snprintf(out + at, n - at, "%s%d", d ? "x" : "", (int)layout.dimensions[d]);
  }
  if (layout.rank == 0) std::snprintf(out, n, "a scalar");
  return out;
}

size_t elements(const LiteRtLayout& layout) {
  size_t n = 1;
  for (unsigned d = 0; d < layout.rank; ++d) n *= static_cast<size_t>(layout.dimensions[d]);
  return n;
}

double now_ms() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr,
                 "usage: litert_runner MODEL.tflite OUT_PREFIX WARMUP REPEAT [INPUT.bin ...]\n");
    return 2;
  }
  const char* model_path = argv[1];
  const char* prefix = argv[2];
  const long warmup = std::strtol(argv[3], nullptr, 10);
  const long repeat = std::strtol(argv[4], nullptr, 10);

  // The environment registers only the CPU accelerator (XNNPACK, built into libLiteRt.so):
  // by default it would also look for GPU and NPU accelerator libraries to load.
  LiteRtEnvOption env_options[1];
  env_options[0].tag = kLiteRtEnvOptionTagAutoRegisterAccelerators;
  env_options[0].value.type = kLiteRtAnyTypeInt;
  env_options[0].value.int_value = kLiteRtHwAcceleratorCpu;
  LiteRtEnvironment env = nullptr;
  check(LiteRtCreateEnvironment(1, env_options, &env), "cannot create LiteRT's environment");

  LiteRtModel model = nullptr;
  check(LiteRtCreateModelFromFile(env, model_path, &model), "cannot load the model",
        model_path);
  LiteRtParamIndex n_signatures = 0;
  check(LiteRtGetNumModelSignatures(model, &n_signatures), "no signatures", model_path);
  if (n_signatures == 0) fail("the model has no signature", model_path);
  const LiteRtParamIndex sig = 0;  // the first (default) signature
  LiteRtSignature signature = nullptr;
  check(LiteRtGetModelSignature(model, sig, &signature), "no signature", model_path);
  LiteRtParamIndex n_inputs = 0, n_outputs = 0;
  check(LiteRtGetNumSignatureInputs(signature, &n_inputs), "no inputs", model_path);
  check(LiteRtGetNumSignatureOutputs(signature, &n_outputs), "no outputs", model_path);
  if (static_cast<size_t>(argc - 5) != n_inputs) {
    std::fprintf(stderr, "litert_runner: the model takes %zu inputs, %d were given\n",
                 static_cast<size_t>(n_inputs), argc - 5);
    return 1;
  }

  // Compiled for the CPU (XNNPACK); threads from WSDEPLOY_THREADS, else LiteRT's default.
  LiteRtOptions options = nullptr;
  check(LiteRtCreateOptions(&options), "cannot create compilation options");
  check(LiteRtSetOptionsHardwareAccelerators(options, kLiteRtHwAcceleratorCpu),
        "cannot select the CPU accelerator");
  if (const char* threads = std::getenv("WSDEPLOY_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(threads, &end, 10);
    if (*threads == '\0' || *end != '\0' || n < 1 || n > 4096) {
      fail("WSDEPLOY_THREADS is not a number of threads", threads);
    }
    // What LrtGetOpaqueCpuOptionsData makes of LrtSetCpuOptionsNumThread(n)
    // (litert/c/options/litert_cpu_options.cc; not exported by libLiteRt.so): a TOML
    // string under the identifier "xnnpack", owned (and freed) by the options.
    char* toml = static_cast<char*>(std::malloc(32));
    if (toml == nullptr) fail("out of memory");
    std::snprintf(toml, 32, "num_threads = %ld\n", n);
    LiteRtOpaqueOptions cpu = nullptr;
    check(LiteRtCreateOpaqueOptions("xnnpack", toml, std::free, &cpu),
          "cannot create the CPU options");
    check(LiteRtAddOpaqueOptions(options, cpu), "cannot add the CPU options");
  }
  LiteRtCompiledModel compiled = nullptr;
  check(LiteRtCreateCompiledModel(env, model, options, &compiled),
        "cannot compile the model for the CPU", model_path);

  // Inputs: the signature's tensor types; the sizes after a colon resize a dynamic input.
  auto* in_types = new LiteRtRankedTensorType[n_inputs > 0 ? n_inputs : 1];
  bool resized = false;
  for (LiteRtParamIndex i = 0; i < n_inputs; ++i) {
    char* path = argv[5 + i];
    LiteRtTensor tensor = nullptr;
    check(LiteRtGetSignatureInputTensorByIndex(signature, i, &tensor), "no input tensor", path);
    LiteRtTensorTypeId type_id;
    check(LiteRtGetTensorTypeId(tensor, &type_id), "no input type", path);
    if (type_id != kLiteRtRankedTensorType) fail("an input of unknown rank", path);
    LiteRtRankedTensorType& type = in_types[i];
    check(LiteRtGetRankedTensorType(tensor, &type), "no input type", path);
    if (dtype(type.element_type).bytes == 0) fail("an input of a type not supported", path);
    bool dynamic = false;
    for (unsigned d = 0; d < type.layout.rank; ++d) dynamic |= type.layout.dimensions[d] < 0;
    char* colon = std::strrchr(path, ':');
    if (colon != nullptr && colon[1] != '\0' &&
        std::strspn(colon + 1, "0123456789x") == std::strlen(colon + 1)) {
      *colon = '\0';  // PATH:D0xD1x...: this run's sizes
      int dims[LITERT_TENSOR_MAX_RANK];
      size_t rank = 0;
      bool same = true;
      for (char* at = colon + 1; *at != '\0'; ++rank) {
        char* end = nullptr;
        const long size = std::strtol(at, &end, 10);
        if (rank >= LITERT_TENSOR_MAX_RANK || end == at) {
          fail("the model refused an input: not sizes", colon + 1);
        }
        dims[rank] = static_cast<int>(size);
        same &= rank < type.layout.rank && dims[rank] == type.layout.dimensions[rank];
        at = (*end == 'x') ? end + 1 : end;
      }
      same &= rank == type.layout.rank;
      if (!same) {
        char model_sizes[128], message[512];
        std::snprintf(message, sizeof message, "%s of sizes %s, the model's input %zu is %s",
                      path, colon + 1, static_cast<size_t>(i),
                      sizes(type.layout, model_sizes, sizeof model_sizes));
        if (!dynamic) fail("the model refused an input", message);
        const LiteRtStatus status =
            LiteRtCompiledModelResizeInputTensor(compiled, sig, i, dims, rank);
        if (status != kLiteRtStatusOk) fail("the model refused an input", message, status);
        resized = true;
      }
    }
  }

  // Buffers as the compiled model asks (its buffer requirements: host memory, alignment),
  // of the tensor types it runs (after any resize); the inputs written once, here.
  auto* in_buffers = new LiteRtTensorBuffer[n_inputs > 0 ? n_inputs : 1];
  for (LiteRtParamIndex i = 0; i < n_inputs; ++i) {
    const char* path = argv[5 + i];
    LiteRtRankedTensorType type = in_types[i];
    check(LiteRtGetCompiledModelInputTensorLayout(compiled, sig, i, &type.layout),
          "no input layout", path);
    for (unsigned d = 0; d < type.layout.rank; ++d) {
      if (type.layout.dimensions[d] < 0) {
        fail("the model refused an input: it has dynamic sizes, none were given", path);
      }
    }
    LiteRtTensorBufferRequirements requirements = nullptr;
    check(LiteRtGetCompiledModelInputBufferRequirements(compiled, sig, i, &requirements),
          "no input buffer requirements", path);
    check(LiteRtCreateManagedTensorBufferFromRequirements(env, &type, requirements,
                                                          &in_buffers[i]),
          "cannot allocate an input buffer", path);
    const size_t expected = elements(type.layout) * dtype(type.element_type).bytes;
    size_t packed = 0;
    check(LiteRtGetTensorBufferPackedSize(in_buffers[i], &packed), "no input size", path);
    if (packed != expected) fail("an input buffer of an unexpected size", path);
    void* data = nullptr;
    check(LiteRtLockTensorBuffer(in_buffers[i], &data, kLiteRtTensorBufferLockModeWrite),
          "cannot write an input buffer", path);
    FILE* f = std::fopen(path, "rb");
    if (f == nullptr) fail("cannot open input", path);
    const size_t got = std::fread(data, 1, expected, f);
    char extra;
    const bool more = std::fread(&extra, 1, 1, f) == 1;
    std::fclose(f);
    if (got != expected || more) fail("input size differs from the model's input", path);
    check(LiteRtUnlockTensorBuffer(in_buffers[i]), "cannot write an input buffer", path);
  }

  auto* out_layouts = new LiteRtLayout[n_outputs > 0 ? n_outputs : 1];
  check(LiteRtGetCompiledModelOutputTensorLayouts(compiled, sig, n_outputs, out_layouts,
                                                  /*update_allocation=*/resized),
        "no output layouts", model_path);
  auto* out_buffers = new LiteRtTensorBuffer[n_outputs > 0 ? n_outputs : 1];
  for (LiteRtParamIndex i = 0; i < n_outputs; ++i) {
    LiteRtTensor tensor = nullptr;
    check(LiteRtGetSignatureOutputTensorByIndex(signature, i, &tensor), "no output tensor");
    LiteRtTensorTypeId type_id;
    check(LiteRtGetTensorTypeId(tensor, &type_id), "no output type");
    if (type_id != kLiteRtRankedTensorType) fail("an output of unknown rank", model_path);
    LiteRtRankedTensorType type;
    check(LiteRtGetRankedTensorType(tensor, &type), "no output type");
    if (dtype(type.element_type).bytes == 0) fail("an output of a type not supported");
    type.layout = out_layouts[i];
    LiteRtTensorBufferRequirements requirements = nullptr;
    check(LiteRtGetCompiledModelOutputBufferRequirements(compiled, sig, i, &requirements),
          "no output buffer requirements");
    check(LiteRtCreateManagedTensorBufferFromRequirements(env, &type, requirements,
                                                          &out_buffers[i]),
          "cannot allocate an output buffer");
  }

  auto* ms = new double[repeat > 0 ? repeat : 1];
  for (long run = 0; run < warmup + repeat; ++run) {
    const double start = now_ms();
    const LiteRtStatus status =
        LiteRtRunCompiledModel(compiled, sig, n_inputs, in_buffers, n_outputs, out_buffers);
    const double stop = now_ms();
    check(status, "execution failed", model_path);
    if (run >= warmup) ms[run - warmup] = stop - start;
  }

  std::printf("{\"outputs\": [");
  for (LiteRtParamIndex i = 0; i < n_outputs; ++i) {
    LiteRtRankedTensorType type;
    check(LiteRtGetTensorBufferTensorType(out_buffers[i], &type), "no output type");
    size_t n = 0;
    check(LiteRtGetTensorBufferPackedSize(out_buffers[i], &n), "no output size");
    void* data = nullptr;
    check(LiteRtLockTensorBuffer(out_buffers[i], &data, kLiteRtTensorBufferLockModeRead),
          "cannot read an output buffer");
    char path[4096];
    std::snprintf(path, sizeof path, "%s-%zu.bin", prefix, static_cast<size_t>(i));
    FILE* f = std::fopen(path, "wb");
    if (f == nullptr) fail("cannot write", path);
    if (std::fwrite(data, 1, n, f) != n || std::fclose(f) != 0) fail("cannot write", path);
    check(LiteRtUnlockTensorBuffer(out_buffers[i]), "cannot read an output buffer");
    std::printf("%s{\"dtype\": %d, \"shape\": [", i ? ", " : "", dtype(type.element_type).code);
    for (unsigned d = 0; d < type.layout.rank; ++d) {
      std::printf("%s%d", d ? ", " : "", static_cast<int>(type.layout.dimensions[d]));
    }
    std::printf("]}");
  }
  std::printf("], \"ms\": [");
  for (long r = 0; r < repeat; ++r) std::printf("%s%.6f", r ? ", " : "", ms[r]);
  std::printf("]}\n");
  std::fflush(stdout);
  std::exit(0);  // not a return: nothing is destroyed (the library's objects die with us)
}

// The part of ONNX Runtime's C ABI a custom-operator library needs, declared here because no installable
// onnxruntime package ships its C headers (the wheels carry only the Python extension).
//
// ONNX Runtime hands a custom-op library an OrtApiBase; GetApi(version) returns a table of function pointers whose
// order is fixed across releases (functions are only ever appended). We name the few slots we call by their index
// in that table (checked against the public header's order at API version 13, which every runtime since 1.13
// serves, and at version 17 for KernelContext_ParallelFor, which runtimes since 1.17 serve), and lay out OrtCustomOp
// as version 13 defines it. Everything else stays opaque.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ort_abi {

struct Status;          // OrtStatus
struct SessionOptions;  // OrtSessionOptions
struct CustomOpDomain;  // OrtCustomOpDomain
struct KernelInfo;      // OrtKernelInfo
struct KernelContext;   // OrtKernelContext
struct Value;           // OrtValue
struct TensorInfo;      // OrtTensorTypeAndShapeInfo

constexpr uint32_t kApiVersion = 13;          // OrtCustomOp's layout, and the table's slots below 102
constexpr uint32_t kParallelApiVersion = 17;  // the first version with KernelContext_ParallelFor (slot 274)

enum ElementType : int { kUndefined = 0, kFloat = 1, kUint8 = 2, kInt32 = 6, kInt64 = 7 };  // ONNXTensorElementDataType
enum ErrorCode : int { kOk = 0, kFail = 1, kInvalidArgument = 2 };              // OrtErrorCode
enum Characteristic : int { kRequired = 0, kOptional = 1 };  // OrtCustomOpInputOutputCharacteristic
enum MemType : int { kMemDefault = 0 };                      // OrtMemType

// The function table (OrtApi): opaque slots, read through the typed accessors below.
struct Api {
  void* slot[275];
};

struct ApiBase {  // OrtApiBase
  const Api* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// Slot indices in OrtApi and their signatures.
template <int I, class F>
F fn(const Api* api) {
  return reinterpret_cast<F>(api->slot[I]);
}
using CreateStatus = Status* (*)(ErrorCode, const char*);                                   // 0
using CreateCustomOpDomain = Status* (*)(const char*, CustomOpDomain**);                      // 26
using CustomOpDomainAdd = Status* (*)(CustomOpDomain*, const void* op);                       // 27
using AddCustomOpDomain = Status* (*)(SessionOptions*, CustomOpDomain*);                      // 28
using GetTensorMutableData = Status* (*)(Value*, void**);                                     // 51
using GetDimensionsCount = Status* (*)(const TensorInfo*, size_t*);                           // 61
using GetDimensions = Status* (*)(const TensorInfo*, int64_t*, size_t);                       // 62
using GetTensorTypeAndShape = Status* (*)(const Value*, TensorInfo**);                        // 65
using KernelInfoGetAttributeFloat = Status* (*)(const KernelInfo*, const char*, float*);       // 85
using KernelInfoGetAttributeInt64 = Status* (*)(const KernelInfo*, const char*, int64_t*);     // 86
using KernelContextGetInput = Status* (*)(const KernelContext*, size_t, const Value**);        // 90
using KernelContextGetOutput = Status* (*)(KernelContext*, size_t, const int64_t*, size_t, Value**);  // 91
using ReleaseStatus = void (*)(Status*);                                                      // 93
using ReleaseTensorInfo = void (*)(TensorInfo*);                                              // 99
// fn(usr_data, i) for i in 0 .. total-1 on the session's intra-op thread pool (num_batch 0: one task an index)
using KernelContextParallelFor = Status* (*)(const KernelContext*, void (*)(void*, size_t), size_t, size_t, void*);  // 274

// OrtCustomOp at version 13: 13 members in this order.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp* op, const Api* api, const KernelInfo* info);
  const char* (*GetName)(const CustomOp* op);
  const char* (*GetExecutionProviderType)(const CustomOp* op);  // nullptr: the CPU provider
  ElementType (*GetInputType)(const CustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const CustomOp* op);
  ElementType (*GetOutputType)(const CustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const CustomOp* op);
  void (*KernelCompute)(void* kernel, KernelContext* context);
  void (*KernelDestroy)(void* kernel);
  Characteristic (*GetInputCharacteristic)(const CustomOp* op, size_t index);
  Characteristic (*GetOutputCharacteristic)(const CustomOp* op, size_t index);
  MemType (*GetInputMemoryType)(const CustomOp* op, size_t index);
};

}  // namespace ort_abi

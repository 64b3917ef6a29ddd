// Autocast rules of the fused ops, for torch.autocast on the CPU and on CUDA. Each rule casts the
// op's floating inputs, then calls the op again below the autocast key (autograd sees the casts):
//   block_sparse_attention  q, k, v in the autocast dtype (the CUDA kernels run in bf16/fp16 only);
//   moe_ffn                 x, w1, w2 in the autocast dtype, the routing weights in float32;
//   moe_topk_softmax        logits in float32 (routing decisions and the balance loss stay exact).
// The diffusion ops have no rule: elementwise and bandwidth-bound, they run in the dtype they get.
// Only inputs on the autocast's device with a float32/bf16/fp16 dtype are cast (float64 stays).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace moediffuseq {
namespace {

using at::Tensor;

template <c10::DeviceType device>
constexpr c10::DispatchKey autocast_key() {
  return device == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA : c10::DispatchKey::AutocastCPU;
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using AttentionSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                                      const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                      double, bool, c10::string_view,
                                                      const std::optional<Tensor>&, int64_t);

template <c10::DeviceType device>
std::tuple<Tensor, Tensor> block_sparse_attention_autocast(const Tensor& q, const Tensor& k, const Tensor& v,
                                                           int64_t window, int64_t dilation,
                                                           const std::optional<Tensor>& global_mask,
                                                           const std::optional<Tensor>& key_padding_mask,
                                                           double scale, bool causal, c10::string_view layout,
                                                           const std::optional<Tensor>& source_lengths,
                                                           int64_t query_offset) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<device>());
  static const auto op = find_op<AttentionSignature>("moediffuseq::block_sparse_attention");
  const auto dtype = at::autocast::get_autocast_dtype(device);
  return op.call(at::autocast::cached_cast(dtype, q, device), at::autocast::cached_cast(dtype, k, device),
                 at::autocast::cached_cast(dtype, v, device), window, dilation, global_mask, key_padding_mask,
                 scale, causal, layout, source_lengths, query_offset);
}

using TopkSignature = std::tuple<Tensor, Tensor>(const Tensor&, int64_t);

template <c10::DeviceType device>
std::tuple<Tensor, Tensor> moe_topk_softmax_autocast(const Tensor& logits, int64_t k) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<device>());
  static const auto op = find_op<TopkSignature>("moediffuseq::moe_topk_softmax");
  return op.call(at::autocast::cached_cast(at::kFloat, logits, device), k);
}

using MoeFfnSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, c10::string_view);

template <c10::DeviceType device>
std::tuple<Tensor, Tensor, Tensor> moe_ffn_autocast(const Tensor& x, const Tensor& weights, const Tensor& indices,
                                                    const Tensor& w1, const Tensor& w2, c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<device>());
  static const auto op = find_op<MoeFfnSignature>("moediffuseq::moe_ffn");
  const auto dtype = at::autocast::get_autocast_dtype(device);
  return op.call(at::autocast::cached_cast(dtype, x, device), at::autocast::cached_cast(at::kFloat, weights, device),
                 indices, at::autocast::cached_cast(dtype, w1, device), at::autocast::cached_cast(dtype, w2, device),
                 activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, AutocastCPU, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_autocast<c10::DeviceType::CPU>);
  m.impl("moe_topk_softmax", &moe_topk_softmax_autocast<c10::DeviceType::CPU>);
  m.impl("moe_ffn", &moe_ffn_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(moediffuseq, AutocastCUDA, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_autocast<c10::DeviceType::CUDA>);
  m.impl("moe_topk_softmax", &moe_topk_softmax_autocast<c10::DeviceType::CUDA>);
  m.impl("moe_ffn", &moe_ffn_autocast<c10::DeviceType::CUDA>);
}

}  // namespace moediffuseq

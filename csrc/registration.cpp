// The op schemas of the fastattnreg namespace. Device kernels register elsewhere:
// C++ CPU kernels in csrc/cpu/*.cpp, Triton CUDA kernels from Python (fastattnreg/triton).
#include <torch/library.h>

TORCH_LIBRARY(fastattnreg, m) {
  // out (B,H,N,D), lse (B,H,N) in float32 (float64 for float64 inputs), maps by `export`.
  // attn_mask: bool (True = takes part) or an additive bias of q's dtype, broadcastable to
  // (B,H,N,N); rng: int64 (seed, offset) of the dropout stream (ops/dropout.py), None when
  // dropout_p == 0.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? rng, float scale, "
      "str export, float dropout_p) -> (Tensor out, Tensor lse, Tensor maps)");
  // dq, dk, dv from any of the gradients of out, lse and maps (None where unused); dmask, the
  // (B,H,N,N) gradient of a float mask, when mask_grad (else empty).
  m.def(
      "attention_bwd(Tensor? dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor? dmaps, Tensor? attn_mask, Tensor? rng, float scale, str export, float dropout_p, "
      "bool mask_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  // Student attention plus its divergence from a teacher's attention, per matched row:
  // out (B,H,N,D), lse (B,H,N), teacher_lse (B,H,R), row_loss (B,H,R); R = N ("all") or 1 ("cls").
  // attn_mask (as attention_fwd's) applies to the student's and the teacher's logits alike.
  m.def(
      "attention_match_fwd(Tensor q, Tensor k, Tensor v, Tensor teacher_q, Tensor teacher_k, "
      "Tensor? attn_mask, float scale, float teacher_scale, str kind, str rows) "
      "-> (Tensor out, Tensor lse, Tensor teacher_lse, Tensor row_loss)");
  // dq, dk, dv from the gradients of out, lse and the per-row losses; the teacher gets none
  // (teacher_lse depends on the teacher alone, so its gradient has nowhere to go), and neither
  // does the mask (it shapes the teacher's logits too).
  m.def(
      "attention_match_bwd(Tensor? dout, Tensor? dlse, Tensor? drow_loss, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor teacher_q, Tensor teacher_k, Tensor teacher_lse, "
      "Tensor? attn_mask, float scale, float teacher_scale, str kind, str rows) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  // Refiner attention, C = expansion * H: w_exp (C,H), w_dw (C,K,K), w_pro (H,C);
  // the four BatchNorms packed (2C + 2H) = bn1 | bn2 | bn3 | adapt; keep: the (B,H,N,N) dropout
  // mask. out (B,H,N,D); probs (B,H,N,N) kept for the backward (empty when neither training nor
  // save_probs); y (B,H,N,N): the refinement's Y = W_r F kept for the backward where the kernel
  // keeps it (the C++ one in training; empty otherwise: the backward recomputes it); mean, var
  // (2C + 2H): the statistics used (batch, biased var; or running); maps: the refined attention
  // A* by `export` ("none": empty; "full" (B,H,N,N), "head_mean" (B,N,N), "cls" (B,H,N)).
  m.def(
      "refined_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor w_exp, Tensor w_dw, "
      "Tensor w_pro, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, Tensor running_var, "
      "Tensor? keep, float[] eps, float scale, float drop_scale, bool training, bool save_probs, "
      "str export) -> (Tensor out, Tensor probs, Tensor y, Tensor mean, Tensor var, Tensor maps)");
  // The gradients from dout and dmaps (the maps' gradient, None where unused).
  m.def(
      "refined_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor w_exp, "
      "Tensor w_dw, Tensor w_pro, Tensor bn_weight, Tensor bn_bias, Tensor probs, Tensor y, "
      "Tensor mean, Tensor var, Tensor? keep, float[] eps, float scale, float drop_scale, "
      "bool training, Tensor? dmaps, str export) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dw_exp, Tensor dw_dw, Tensor dw_pro, "
      "Tensor dbn_weight, Tensor dbn_bias)");
}

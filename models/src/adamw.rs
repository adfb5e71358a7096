//! AdamW whose state can be saved and restored.
//!
//! candle-nn's `AdamW` keeps its moments private, so a checkpoint could not hold them and a
//! resumed run would restart the moment estimates from zero. This one does the same arithmetic
//! (decoupled weight decay, bias-corrected moments; a test checks it step for step against
//! candle's) over named parameters, and exposes its state as a name → tensor map
//! (`m/NAME`, `v/NAME`) plus the step count, ready for safetensors.
//!
//! Weight decay applies to weight matrices only, as in Hugging Face's trainer and minGPT:
//! parameters of rank < 2 (biases, LayerNorm / RMSNorm gains) and the token and position
//! embeddings (`wte`, `wpe`, `embed_tokens`, and so a head tied to them) are never decayed
//! ([`decays`]). Without weight decay the arithmetic is candle's exactly. On the CPU the update
//! runs in place ([`crate::kernels::adamw_update`]), bit-identical to the composition.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
pub use candle_nn::ParamsAdamW;
use candle_nn::VarMap;

use crate::error::{ModelError, Result};

struct Slot {
    name: String,
    var: Var,
    m: Var,
    v: Var,
    /// Whether weight decay applies ([`decays`]).
    decay: bool,
}

/// Whether AdamW decays the parameter `name` of this shape: matrices yes; biases, norm gains
/// (rank < 2) and embedding tables (`wte`, `wpe`, `embed_tokens`) no.
pub fn decays(name: &str, var: &Var) -> bool {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let last = module.rsplit('.').next().unwrap_or(module);
    var.rank() >= 2 && !matches!(last, "wte" | "wpe" | "embed_tokens" | "embed_positions")
}

pub struct AdamW {
    slots: Vec<Slot>,
    step_t: usize,
    params: ParamsAdamW,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.slots.len())
            .field("step", &self.step_t)
            .finish()
    }
}

impl AdamW {
    /// Optimises `named` parameters (names must be unique; they key the saved state).
    pub fn new(named: Vec<(String, Var)>, params: ParamsAdamW) -> Result<Self> {
        let slots = named
            .into_iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(name, var)| {
                let m = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let v = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let decay = decays(&name, &var);
                Ok(Slot { name, var, m, v, decay })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step_t: 0,
            params,
        })
    }

    /// Every var of a `VarMap`, in name order.
    pub fn from_varmap(vars: &VarMap, params: ParamsAdamW) -> Result<Self> {
        let data = vars.data().lock().expect("varmap lock");
        let mut named: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(named, params)
    }

    pub fn steps(&self) -> usize {
        self.step_t
    }

    pub fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One update with the gradients in `grads` (parameters without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// One update with the gradients in `grads` multiplied by `grad_scale` (a clipping factor,
    /// [`crate::rl::clip_scale`]): the same arithmetic as scaling them with `g * grad_scale`
    /// first and calling [`Self::step`], without writing the scaled copies.
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let scale_m = 1.0 / (1.0 - p.beta1.powi(self.step_t as i32));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(self.step_t as i32));
        for s in &self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let decays = s.decay && p.weight_decay != 0.0;
            let fused = crate::kernels::AdamWStep {
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                lr: p.lr,
                scale_m,
                scale_v,
                decay: decays.then_some(1.0 - p.lr * p.weight_decay),
                grad_scale,
            };
            if crate::kernels::adamw_update(s.var.as_tensor(), s.m.as_tensor(), s.v.as_tensor(), g, &fused)? {
                continue;
            }
            let scaled;
            let g = if grad_scale == 1.0 {
                g
            } else {
                scaled = (g * grad_scale)?;
                &scaled
            };
            let next_m = ((s.m.as_tensor() * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let next_v = ((s.v.as_tensor() * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let decayed = if decays {
                (s.var.as_tensor() * (1.0 - p.lr * p.weight_decay))?
            } else {
                s.var.as_tensor().clone()
            };
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let next = (decayed - (update * p.lr)?)?;
            s.m.set(&next_m)?;
            s.v.set(&next_v)?;
            s.var.set(&next)?;
        }
        Ok(())
    }

    /// The moments as `m/NAME`, `v/NAME` (copies) and the step count.
    pub fn state(&self) -> Result<(usize, HashMap<String, Tensor>)> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m/{}", s.name), s.m.as_tensor().copy()?);
            out.insert(format!("v/{}", s.name), s.v.as_tensor().copy()?);
        }
        Ok((self.step_t, out))
    }

    /// Restores what [`Self::state`] returned; every moment must be present with its shape.
    pub fn load_state(&mut self, step: usize, state: &HashMap<String, Tensor>) -> Result<()> {
        for s in &self.slots {
            for (key, var) in [(format!("m/{}", s.name), &s.m), (format!("v/{}", s.name), &s.v)] {
                let t = state
                    .get(&key)
                    .ok_or_else(|| ModelError::InvalidArgument(format!("optimiser state lacks {key}")))?;
                if t.dims() != var.dims() {
                    return Err(ModelError::InvalidArgument(format!(
                        "optimiser state {key} has shape {:?}, the parameter {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
            }
        }
        self.step_t = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::Optimizer;

    fn loss(w: &Var, x: &Tensor) -> Tensor {
        // A small least-squares problem: |x w - 1|^2.
        (x.matmul(w.as_tensor()).unwrap() - 1.0)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    }

    fn setup() -> (Var, Tensor) {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[0.5f32], [-0.3], [0.8]], &dev).unwrap()).unwrap();
        let x = Tensor::new(&[[1.0f32, 2.0, -1.0], [0.5, -0.5, 2.0]], &dev).unwrap();
        (w, x)
    }

    const P: ParamsAdamW = ParamsAdamW {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };

    #[test]
    fn matches_candle_adamw_step_for_step() {
        let (w1, x) = setup();
        let (w2, _) = setup();
        let mut ours = AdamW::new(vec![("w".into(), w1.clone())], P).unwrap();
        let mut theirs = candle_nn::AdamW::new(vec![w2.clone()], P).unwrap();
        for _ in 0..6 {
            ours.step(&loss(&w1, &x).backward().unwrap()).unwrap();
            theirs.step(&loss(&w2, &x).backward().unwrap()).unwrap();
            assert_eq!(
                w1.as_tensor().to_vec2::<f32>().unwrap(),
                w2.as_tensor().to_vec2::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn weight_decay_skips_biases_norm_gains_and_embeddings() {
        let dev = Device::Cpu;
        let named: Vec<(String, Var)> = [
            ("transformer.h.0.attn.c_attn.weight", vec![2usize, 2]),
            ("transformer.h.0.attn.c_attn.bias", vec![2]),
            ("transformer.ln_f.weight", vec![2]),
            ("transformer.wte.weight", vec![3, 2]),
            ("transformer.wpe.weight", vec![3, 2]),
            ("model.embed_tokens.weight", vec![3, 2]),
            ("lm_head.weight", vec![3, 2]),
        ]
        .into_iter()
        .map(|(n, shape)| (n.to_string(), Var::ones(shape, DType::F32, &dev).unwrap()))
        .collect();
        let mut opt = AdamW::new(named.clone(), P).unwrap();
        // Gradient 1 everywhere: Adam's first step moves every entry by -lr; decay multiplies
        // the decayed ones by 1 - lr * wd first.
        let sum = named
            .iter()
            .map(|(_, v)| v.as_tensor().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        opt.step(&sum.backward().unwrap()).unwrap();
        let decayed = (1.0 - P.lr * P.weight_decay - P.lr) as f32;
        for (name, v) in &named {
            let got = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = if name.ends_with("c_attn.weight") || name == "lm_head.weight" {
                decayed
            } else {
                (1.0 - P.lr) as f32
            };
            assert!(
                got.iter().all(|&x| (x - want).abs() < 1e-6),
                "{name}: {got:?}, want {want}"
            );
        }
    }

    #[test]
    fn saved_state_resumes_exactly() {
        let (w, x) = setup();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], P).unwrap();
        for _ in 0..3 {
            opt.step(&loss(&w, &x).backward().unwrap()).unwrap();
        }
        let (step, state) = opt.state().unwrap();
        let saved_w = w.as_tensor().copy().unwrap();
        for _ in 0..2 {
            opt.step(&loss(&w, &x).backward().unwrap()).unwrap();
        }
        let straight = w.as_tensor().to_vec2::<f32>().unwrap();
        // A fresh optimiser over the saved weights and state takes the same two steps.
        let w2 = Var::from_tensor(&saved_w).unwrap();
        let mut resumed = AdamW::new(vec![("w".into(), w2.clone())], P).unwrap();
        resumed.load_state(step, &state).unwrap();
        for _ in 0..2 {
            resumed.step(&loss(&w2, &x).backward().unwrap()).unwrap();
        }
        assert_eq!(w2.as_tensor().to_vec2::<f32>().unwrap(), straight);
        assert_eq!(resumed.steps(), 5);
        // Missing or mis-shaped state is refused.
        let mut other = AdamW::new(
            vec![("u".into(), Var::zeros((3, 1), DType::F32, &Device::Cpu).unwrap())],
            P,
        )
        .unwrap();
        assert!(other.load_state(3, &state).unwrap_err().to_string().contains("m/u"));
    }
}

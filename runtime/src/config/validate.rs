//! The checks [`Config::load`] runs after overrides and path resolution: each failure names
//! its key (a config error, exit 2).

use super::*;

impl Config {
    pub(super) fn validate(&self) -> Result<(), String> {
        let m = &self.models.policy;
        if m.path.is_some() == m.builtin.is_some() {
            return Err("models.policy: set exactly one of `path` and `builtin`".into());
        }
        if let Some(p) = &m.path {
            if !p.join("config.json").is_file() {
                return Err(format!("models.policy.path: no config.json in {}", p.display()));
            }
        }
        if !self.data.prompts.is_file() {
            return Err(format!("data.prompts: file not found: {}", self.data.prompts.display()));
        }
        let d = &self.data;
        if d.prompts_per_ticket == 0
            || d.prompts_per_step == 0
            || !d.prompts_per_step.is_multiple_of(d.prompts_per_ticket)
        {
            return Err(format!(
                "data.prompts_per_step ({}) must be a positive multiple of data.prompts_per_ticket ({})",
                d.prompts_per_step, d.prompts_per_ticket
            ));
        }
        if d.samples_per_prompt == 0 {
            return Err("data.samples_per_prompt must be >= 1".into());
        }
        if self.sampling.max_new_tokens == 0 {
            return Err("sampling.max_new_tokens must be >= 1".into());
        }
        if self.steps == 0 {
            return Err("steps must be >= 1".into());
        }
        if self.mode.inflight_recompute_kv && !self.mode.inflight_updates {
            return Err("mode.inflight_recompute_kv needs mode.inflight_updates = true".into());
        }
        if self.mode.inflight_updates && !self.placement.nodes.is_empty() {
            return Err("mode.inflight_updates: samplers on worker nodes adopt weights only between batches".into());
        }
        self.validate_algorithm()?;
        use tandem_actors::Advantage;
        match self.algorithm.advantage {
            Advantage::Gae => {
                let c = &self.models.critic;
                match c.init {
                    CriticInit::RewardModel if self.reward.kind != RewardKind::RewardModel => {
                        return Err("models.critic.init = \"reward_model\" needs reward.kind = \"reward_model\"; use init = \"policy\" with a rule-based reward".into())
                    }
                    CriticInit::Path if c.path.is_none() => return Err("models.critic.path is required with init = \"path\"".into()),
                    _ => {}
                }
            }
            _ if d.samples_per_prompt < 2 => {
                return Err("algorithm.advantage grpo/rloo needs data.samples_per_prompt >= 2".into())
            }
            _ => {}
        }
        match self.reward.kind {
            RewardKind::RewardModel => match &self.reward.model {
                None => return Err("reward.model is required with kind = \"reward_model\"".into()),
                Some(p) if !p.join("config.json").is_file() => {
                    return Err(format!("reward.model: no config.json in {}", p.display()))
                }
                _ => {}
            },
            RewardKind::Regex if self.reward.pattern.is_none() => {
                return Err("reward.pattern is required with kind = \"regex\"".into())
            }
            RewardKind::Command if !matches!(&self.reward.command, Some(c) if !c.is_empty()) => {
                return Err(
                    "reward.command (a non-empty list: program and arguments) is required with kind = \"command\""
                        .into(),
                )
            }
            _ => {}
        }
        if !(self.reward.timeout_s > 0.0 && self.reward.timeout_s.is_finite()) {
            return Err("reward.timeout_s must be > 0".into());
        }
        if self.reward.stop_window == Some(0) {
            return Err("reward.stop_window must be >= 1".into());
        }
        if let Some(m) = &self.mock_labeller {
            self.validate_mock_labeller(m)?;
        }
        if let Some(e) = &self.eval {
            self.validate_eval(e)?;
        }
        if self.replay_capacity() < self.batch_size() {
            return Err(format!(
                "channels.replay_capacity ({}) must hold at least one batch ({})",
                self.replay_capacity(),
                self.batch_size()
            ));
        }
        if self.metrics.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!("metrics.addr: {:?} is not HOST:PORT", self.metrics.addr));
        }
        if self.metrics.sample_interval_s.is_nan() || self.metrics.sample_interval_s <= 0.0 {
            return Err("metrics.sample_interval_s must be > 0".into());
        }
        if self.store.retention == Retention::EveryN && self.store.every == 0 {
            return Err("store.every must be >= 1 with retention = \"every_n\"".into());
        }
        if self.store.segment_bytes < 1024 || self.store.queue == 0 {
            return Err("store.segment_bytes must be >= 1024 and store.queue >= 1".into());
        }
        self.checkpoints.validate()?;
        let sv = &self.supervision;
        if !(sv.window_s > 0.0 && sv.backoff_s >= 0.0 && sv.backoff_max_s >= sv.backoff_s) {
            return Err("supervision: need window_s > 0 and 0 <= backoff_s <= backoff_max_s".into());
        }
        if sv.max_nonfinite_steps == 0 {
            return Err("supervision.max_nonfinite_steps must be >= 1".into());
        }
        let p = &self.placement;
        let local = p.rollout_devices.iter().map(|d| ("placement.rollout_devices", d));
        let stages = [
            ("placement.reward_device", &p.reward_device),
            ("placement.value_device", &p.value_device),
            ("placement.learner_device", &p.learner_device),
        ];
        for (key, d) in local.chain(stages) {
            d.check_built().map_err(|e| format!("{key}: {e}"))?;
        }
        let remote: usize = p.nodes.iter().map(|n| n.rollouts).sum();
        if p.rollout_devices.len() * p.rollouts_per_device + remote == 0 {
            return Err("placement: at least one rollout actor is needed".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for n in &p.nodes {
            let ok = !n.name.is_empty()
                && n.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(format!(
                    "placement.nodes: name {:?} must be letters, digits, '-' or '_'",
                    n.name
                ));
            }
            if !names.insert(&n.name) {
                return Err(format!("placement.nodes: node {:?} is placed twice", n.name));
            }
            if n.rollouts == 0 || n.devices.is_empty() {
                return Err(format!(
                    "placement.nodes {:?}: needs rollouts >= 1 and a device",
                    n.name
                ));
            }
        }
        match &self.cluster {
            None if !p.nodes.is_empty() => {
                return Err("placement.nodes needs a [cluster] section (the head's listener and cookie)".into())
            }
            Some(c) => {
                if c.listen.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!("cluster.listen: {:?} is not HOST:PORT", c.listen));
                }
                if c.chunk_bytes < 1024 || c.chunk_bytes > 16 << 20 {
                    return Err("cluster.chunk_bytes must be between 1024 and 16777216".into());
                }
                if !(c.sample_timeout_s > 0.0 && c.wait_for_nodes_s >= 0.0) {
                    return Err("cluster: need sample_timeout_s > 0 and wait_for_nodes_s >= 0".into());
                }
                if c.tls_cert.is_some() != c.tls_key.is_some() {
                    return Err("cluster.tls_cert and cluster.tls_key go together: set both (TLS) or neither".into());
                }
                // Their contents are read where TLS is set up (crate::cluster), before the run starts.
                for (key, p) in [("tls_cert", &c.tls_cert), ("tls_key", &c.tls_key)] {
                    if let Some(p) = p.as_ref().filter(|p| !p.is_file()) {
                        return Err(format!("cluster.{key}: file not found: {}", p.display()));
                    }
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Sampling, mode and algorithm settings: each bad value names its key.
    fn validate_algorithm(&self) -> Result<(), String> {
        let bad = |key: &str, want: &str, got: &dyn std::fmt::Display| Err(format!("{key} must be {want}, got {got}"));
        let s = &self.sampling;
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return bad(
                "sampling.temperature",
                "a finite number >= 0 (0 = greedy)",
                &s.temperature,
            );
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad("sampling.top_p", "in (0, 1]", &s.top_p);
        }
        let d = &self.data;
        if d.prompt_max_tokens == 0 || d.prompt_max_tokens > MAX_SEQUENCE_TOKENS {
            return bad(
                "data.prompt_max_tokens",
                &format!("between 1 and {MAX_SEQUENCE_TOKENS}"),
                &d.prompt_max_tokens,
            );
        }
        if s.max_new_tokens > MAX_SEQUENCE_TOKENS {
            return bad(
                "sampling.max_new_tokens",
                &format!("between 1 and {MAX_SEQUENCE_TOKENS}"),
                &s.max_new_tokens,
            );
        }
        if self.mode.publish_every == 0 {
            return bad("mode.publish_every", ">= 1", &0);
        }
        let a = &self.algorithm;
        if a.ppo_epochs == 0 {
            return bad("algorithm.ppo_epochs", ">= 1", &0);
        }
        if a.minibatch_size == 0 {
            return bad("algorithm.minibatch_size", ">= 1", &0);
        }
        let nonneg = [
            ("algorithm.policy_lr", a.policy_lr),
            ("algorithm.critic_lr", a.critic_lr),
            ("algorithm.weight_decay", a.weight_decay),
            ("algorithm.max_grad_norm", a.max_grad_norm),
            ("algorithm.ptx_coef", a.ptx_coef),
            ("algorithm.grpo.eps", a.grpo.eps),
            ("algorithm.loss.vf_coef", a.loss.vf_coef),
        ];
        for (key, v) in nonneg {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(key, "a finite number >= 0", &v);
            }
        }
        for (key, v) in [
            ("algorithm.gae.gamma", a.gae.gamma),
            ("algorithm.gae.lambda", a.gae.lambda),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(key, "in [0, 1]", &v);
            }
        }
        let l = &a.loss;
        if !(l.clip_eps > 0.0 && l.clip_eps < 1.0) {
            return bad("algorithm.loss.clip_eps", "in (0, 1)", &l.clip_eps);
        }
        if let Some(c) = l.value_clip.filter(|c| !(*c > 0.0 && c.is_finite())) {
            return bad("algorithm.loss.value_clip", "a finite number > 0", &c);
        }
        if !l.entropy_coef.is_finite() {
            return bad("algorithm.loss.entropy_coef", "finite", &l.entropy_coef);
        }
        if let Some(c) = l.behaviour_weight_cap.filter(|c| c.is_nan() || *c < 1.0) {
            return bad("algorithm.loss.behaviour_weight_cap", ">= 1 (inf: untruncated)", &c);
        }
        if let Some(n) = l.token_sum_norm.filter(|n| !(*n > 0.0 && n.is_finite())) {
            return bad("algorithm.loss.token_sum_norm", "a finite number > 0", &n);
        }
        if let Some(c) = a.reward.score_clip.filter(|c| c.is_nan() || *c <= 0.0) {
            return bad("algorithm.reward.score_clip", "> 0", &c);
        }
        if let Some(e) = a.ema_decay.filter(|e| !(0.0..1.0).contains(e)) {
            return bad("algorithm.ema_decay", "in [0, 1)", &e);
        }
        use tandem_models::rl::KlControllerConfig as Kl;
        match a.kl {
            Kl::Fixed { beta } if !(beta >= 0.0 && beta.is_finite()) => {
                return bad("algorithm.kl.beta", "a finite number >= 0", &beta)
            }
            Kl::Adaptive { init_beta, .. } if !(init_beta > 0.0 && init_beta.is_finite()) => {
                return bad("algorithm.kl.init_beta", "a finite number > 0", &init_beta)
            }
            Kl::Adaptive { target, .. } if !(target > 0.0 && target.is_finite()) => {
                return bad("algorithm.kl.target", "a finite number > 0", &target)
            }
            Kl::Adaptive { k_beta, .. } if !(k_beta > 0.0 && k_beta < 5.0) => {
                return bad("algorithm.kl.k_beta", "in (0, 5)", &k_beta)
            }
            _ => {}
        }
        match (&d.pretrain, a.ptx_coef > 0.0) {
            (None, true) => return Err("algorithm.ptx_coef > 0 needs data.pretrain (PPO-ptx texts)".into()),
            (Some(_), false) => {
                return Err("data.pretrain is set but algorithm.ptx_coef is 0: set a ptx_coef > 0 or remove it".into())
            }
            (Some(p), true) if !p.is_file() => return Err(format!("data.pretrain: file not found: {}", p.display())),
            _ => {}
        }
        if d.pretrain.is_some() && (d.pretrain_rows == 0 || d.pretrain_max_tokens < 2) {
            return Err("data.pretrain_rows must be >= 1 and data.pretrain_max_tokens >= 2".into());
        }
        Ok(())
    }

    /// `[eval]`: a period the published versions meet, a prompts file, a local device.
    fn validate_eval(&self, e: &EvalConfig) -> Result<(), String> {
        let m = self.mode.publish_every.max(1);
        if e.every == 0 || !e.every.is_multiple_of(m) {
            return Err(format!(
                "eval.every ({}) must be a positive multiple of mode.publish_every ({m}): only published weights are evaluated",
                e.every
            ));
        }
        if !e.prompts.is_file() {
            return Err(format!("eval.prompts: file not found: {}", e.prompts.display()));
        }
        if self.placement.rollout_devices.is_empty() {
            return Err("[eval] runs on the first of placement.rollout_devices, which is empty".into());
        }
        Ok(())
    }

    /// `[mock_labeller]`: its own keys, and a critic that does not need the reward model it
    /// trains.
    fn validate_mock_labeller(&self, m: &MockLabellerConfig) -> Result<(), String> {
        if m.pairs < 2 || m.eval_pairs < 1 || m.epochs == 0 || m.batch_size == 0 {
            return Err("mock_labeller: needs pairs >= 2, eval_pairs >= 1, epochs >= 1, batch_size >= 1".into());
        }
        if !(m.lr > 0.0 && m.lr.is_finite()) {
            return Err("mock_labeller.lr must be > 0".into());
        }
        if self.models.critic.init == CriticInit::RewardModel {
            return Err("mock_labeller: models.critic.init = \"reward_model\" is not available (the reward model is trained during the run); use \"policy\"".into());
        }
        Ok(())
    }
}

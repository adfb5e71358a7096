//! The report's charts: which fields of the run go on which panel, with titles, axis labels,
//! units and captions. Each chart is a `<section>` with a stable id (see the module docs of
//! `report`).

use super::data::RunData;
use super::plot::{panel, Figure, Panel, Series, YRange, PALETTE, SECONDS};

/// The charts of a run, in page order. Charts over steps mark the steps at which a resumed
/// session began, the actor chart the times; `chart-true-score` is there only when the run
/// recorded a true score (the mock labeller), `chart-eval` only when it evaluated held-out
/// prompts (`[eval]`).
pub(super) fn figures(d: &RunData) -> Vec<Figure> {
    let (m, actors) = (&d.metrics, d.actors.as_ref());
    let c = PALETTE;
    let auto = YRange::Auto { zero: false };
    let zero = || YRange::Auto { zero: true };

    let band: Vec<(f64, f64, f64)> = m
        .rows
        .iter()
        .map(|r| {
            (
                r.step as f64,
                r.stats.reward_mean - r.stats.reward_std,
                r.stats.reward_mean + r.stats.reward_std,
            )
        })
        .collect();
    let mut reward = Series::new(
        "reward_mean",
        "reward mean (score + KL penalty)",
        c[0],
        m.series(|r| r.stats.reward_mean),
    );
    reward.band = Some(("reward ± 1 std over the batch".into(), band));

    let wall = m.series(|r| r.wall_s);
    let step_wall: Vec<(f64, Option<f64>)> = wall
        .iter()
        .enumerate()
        .map(|(i, &(x, w))| {
            let prev = if i == 0 { Some(0.0) } else { wall[i - 1].1 };
            (x, w.zip(prev).map(|(w, p)| w - p))
        })
        .collect();

    // Generated tokens over the step's wall time.
    let throughput: Vec<(f64, Option<f64>)> = m
        .rows
        .iter()
        .zip(&step_wall)
        .map(|(r, &(x, w))| (x, w.filter(|&w| w > 0.0).map(|w| r.tokens_generated as f64 / w)))
        .collect();

    let actor_fig = match actors {
        Some(a) if !a.busy.is_empty() => {
            let series = a
                .busy
                .iter()
                .enumerate()
                .map(|(i, (name, pts))| {
                    let s = Series::new(name, name, c[i % c.len()], pts.clone());
                    // Past ten actors the colours repeat: tell the second round apart by dashes.
                    if (i / c.len()) % 2 == 1 {
                        s.dashed()
                    } else {
                        s
                    }
                })
                .collect();
            Figure {
                id: "chart-actors",
                title: "Actor utilisation",
                caption: "Fraction of each sampling interval the actor spent computing (from actors.jsonl).".into(),
                wide: true,
                panels: vec![Panel {
                    x_label: SECONDS,
                    y_label: "busy fraction (0–1)".into(),
                    x_integer: false,
                    y: YRange::Fixed(0.0, 1.0),
                    series,
                    markers: a
                        .session_starts
                        .iter()
                        .map(|&t| (t, "a resumed session began".into()))
                        .collect(),
                }],
                note: None,
            }
        }
        _ => Figure {
            id: "chart-actors",
            title: "Actor utilisation",
            caption: "Fraction of each sampling interval the actor spent computing (from actors.jsonl).".into(),
            wide: true,
            panels: vec![],
            note: Some("no actor samples in this run".into()),
        },
    };

    let mut figs = vec![
        Figure {
            id: "chart-reward",
            title: "Reward and score",
            caption: "Batch means per learner step. The reward adds the KL penalty to the score.".into(),
            wide: false,
            panels: vec![panel(
                "reward per response",
                auto,
                vec![
                    reward,
                    Series::new(
                        "score_mean",
                        "score mean (reward model / rule)",
                        c[1],
                        m.series(|r| r.stats.score_mean),
                    ),
                ],
            )],
            note: None,
        },
        Figure {
            id: "chart-clip",
            title: "PPO clip fraction",
            caption: "Fraction of response tokens whose probability ratio was clipped, averaged over minibatches."
                .into(),
            wide: false,
            panels: vec![panel(
                "clip fraction (of tokens)",
                zero(),
                vec![Series::new(
                    "clip_frac",
                    "clip fraction",
                    c[4],
                    m.series(|r| r.stats.clip_frac),
                )],
            )],
            note: None,
        },
        Figure {
            id: "chart-kl",
            title: "KL to the reference and β",
            caption: "KL of the sampled responses to the reference model, and the KL-penalty coefficient β.".into(),
            wide: false,
            panels: vec![
                panel(
                    "KL (nats per response)",
                    auto,
                    vec![Series::new("kl", "KL", c[3], m.series(|r| r.stats.kl))],
                ),
                panel(
                    "β (KL coefficient)",
                    auto,
                    vec![Series::new("beta", "β", c[9], m.series(|r| r.stats.beta))],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-loss",
            title: "Policy and value loss",
            caption: "Mean over the step's PPO epochs and minibatches.".into(),
            wide: false,
            panels: vec![
                panel(
                    "policy loss",
                    auto,
                    vec![Series::new(
                        "policy_loss",
                        "policy loss",
                        c[0],
                        m.series(|r| r.stats.policy_loss),
                    )],
                ),
                panel(
                    "value loss",
                    zero(),
                    vec![Series::new(
                        "value_loss",
                        "value loss",
                        c[2],
                        m.series(|r| r.stats.value_loss),
                    )],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-entropy",
            title: "Entropy and response length",
            caption: "Policy entropy over response tokens, and the mean response length.".into(),
            wide: false,
            panels: vec![
                panel(
                    "entropy (nats/token)",
                    auto,
                    vec![Series::new("entropy", "entropy", c[5], m.series(|r| r.stats.entropy))],
                ),
                panel(
                    "length (tokens)",
                    zero(),
                    vec![Series::new(
                        "response_len_mean",
                        "response length",
                        c[7],
                        m.series(|r| r.stats.response_len_mean),
                    )],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-staleness",
            title: "Staleness",
            caption: "How many policy versions behind the learner the trained samples were, and how many samples \
                      were dropped for exceeding the bound."
                .into(),
            wide: false,
            panels: vec![
                panel(
                    "staleness (versions)",
                    zero(),
                    vec![
                        Series::new("staleness_mean", "mean", c[0], m.series(|r| r.staleness_mean)),
                        Series::new("staleness_max", "max", c[3], m.series(|r| r.staleness_max as f64)).dashed(),
                    ],
                ),
                panel(
                    "dropped (samples)",
                    zero(),
                    vec![Series::new(
                        "dropped_stale",
                        "dropped stale samples, cumulative",
                        c[7],
                        m.series(|r| r.dropped_stale as f64),
                    )],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-token-staleness",
            title: "Staleness per token",
            caption: "How many versions behind the learner each trained response token was sampled (a token \
                      records the version that sampled it, which in-flight updates change within a response), \
                      and the fraction of tokens sampled by an older version than the one trained."
                .into(),
            wide: false,
            panels: vec![
                panel(
                    "token staleness (versions)",
                    zero(),
                    vec![
                        Series::new(
                            "token_staleness_mean",
                            "mean",
                            c[0],
                            m.series(|r| r.token_staleness.token_staleness_mean),
                        ),
                        Series::new(
                            "token_staleness_max",
                            "max",
                            c[3],
                            m.series(|r| r.token_staleness.token_staleness_max as f64),
                        )
                        .dashed(),
                    ],
                ),
                panel(
                    "off-policy tokens (fraction)",
                    YRange::Fixed(0.0, 1.0),
                    vec![Series::new(
                        "off_policy_token_frac",
                        "off-policy token fraction",
                        c[7],
                        m.series(|r| r.token_staleness.off_policy_token_frac),
                    )],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-behaviour-ratio",
            title: "Behaviour importance ratio",
            caption: "π_prox / π_behaviour per response token: the policy at the start of the step over the one \
                      that sampled the token (1 on-policy), and the fraction of tokens above the weight's cap."
                .into(),
            wide: false,
            panels: vec![
                panel(
                    "ratio π_prox / π_behaviour",
                    auto,
                    vec![
                        Series::new(
                            "behaviour_ratio_mean",
                            "mean",
                            c[0],
                            m.series(|r| r.stats.behaviour_ratio_mean),
                        ),
                        Series::new(
                            "behaviour_ratio_min",
                            "min",
                            c[2],
                            m.series(|r| r.stats.behaviour_ratio_min),
                        )
                        .dashed(),
                        Series::new(
                            "behaviour_ratio_max",
                            "max",
                            c[3],
                            m.series(|r| r.stats.behaviour_ratio_max),
                        )
                        .dashed(),
                    ],
                ),
                panel(
                    "truncated (fraction of tokens)",
                    zero(),
                    vec![Series::new(
                        "behaviour_ratio_trunc_frac",
                        "truncated by the cap",
                        c[4],
                        m.series(|r| r.stats.behaviour_ratio_trunc_frac),
                    )],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-mismatch-kl",
            title: "Behaviour–proximal mismatch KL",
            caption: "KL(π_behaviour ‖ π_prox) per sampled token (k3 estimate): how far the policy that sampled \
                      the tokens is from the policy at the start of the learner step; 0 on-policy."
                .into(),
            wide: false,
            panels: vec![panel(
                "mismatch KL (nats/token)",
                zero(),
                vec![Series::new(
                    "behaviour_mismatch_kl",
                    "mismatch KL",
                    c[6],
                    m.series(|r| r.stats.behaviour_mismatch_kl),
                )],
            )],
            note: None,
        },
        Figure {
            id: "chart-phases",
            title: "Seconds per step, by phase",
            caption: "Generate, reward and value are summed over the step's batch; in async mode phases overlap, \
                      so they need not add up to the step's wall time (dashed)."
                .into(),
            wide: true,
            panels: vec![panel(
                "seconds per step (s)",
                zero(),
                vec![
                    Series::new("generate_s", "generate", c[0], m.series(|r| r.generate_s)),
                    Series::new("reward_s", "reward", c[1], m.series(|r| r.reward_s)),
                    Series::new("value_s", "value", c[2], m.series(|r| r.value_s)),
                    Series::new("learn_s", "learn", c[3], m.series(|r| r.learn_s)),
                    Series::new("weight_sync_s", "weight sync", c[4], m.series(|r| r.weight_sync_s)),
                    Series::new("learner_wait_s", "learner wait", c[5], m.series(|r| r.learner_wait_s)),
                    Series::new("step_wall_s", "step wall time", "#333333", step_wall).dashed(),
                ],
            )],
            note: None,
        },
        Figure {
            id: "chart-approx-kl",
            title: "PPO approx KL",
            caption: "How far each update moved the policy: the mean over response tokens of (r − 1) − log r, r \
                      the probability ratio to the policy at the start of the step, averaged over minibatches."
                .into(),
            wide: false,
            panels: vec![panel(
                "approx KL (nats/token)",
                zero(),
                vec![Series::new(
                    "approx_kl",
                    "approx KL",
                    c[6],
                    m.series(|r| r.stats.approx_kl),
                )],
            )],
            note: None,
        },
        Figure {
            id: "chart-explained-var",
            title: "Explained variance",
            caption: "How well the critic's values predict the returns: 1 − Var(returns − values) / Var(returns). 1 \
                      is a perfect critic, 0 or less no better than a constant."
                .into(),
            wide: false,
            panels: vec![panel(
                "explained variance",
                auto,
                vec![Series::new(
                    "explained_var",
                    "explained variance",
                    c[8],
                    m.series(|r| r.stats.explained_var),
                )],
            )],
            note: None,
        },
        Figure {
            id: "chart-throughput",
            title: "Throughput",
            caption: "Tokens generated for each step over the step's wall time.".into(),
            wide: false,
            panels: vec![panel(
                "tokens per second",
                zero(),
                vec![Series::new("tokens_per_s", "tokens/s", c[2], throughput)],
            )],
            note: None,
        },
        actor_fig,
    ];
    if m.rows.iter().any(|r| r.true_score_mean.is_some()) {
        figs.insert(
            1,
            Figure {
                id: "chart-true-score",
                title: "True score",
                caption: "The programmatic labeller's score of the responses beside the learned reward model's.".into(),
                wide: false,
                panels: vec![panel(
                    "score per response",
                    auto,
                    vec![
                        Series::new(
                            "true_score_mean",
                            "true score",
                            c[2],
                            m.series_opt(|r| r.true_score_mean),
                        ),
                        Series::new(
                            "score_mean",
                            "learned score (reward model)",
                            c[1],
                            m.series(|r| r.stats.score_mean),
                        ),
                    ],
                )],
                note: None,
            },
        );
    }
    // Held-out evaluation: a point per evaluated step, joined (the steps between have none).
    let evaluated = |f: fn(&tandem_actors::HeldOutEval) -> Option<f64>| -> Vec<(f64, Option<f64>)> {
        m.rows
            .iter()
            .filter_map(|r| f(&r.eval).filter(|v| v.is_finite()).map(|v| (r.step as f64, Some(v))))
            .collect()
    };
    let (accuracy, score) = (evaluated(|e| e.eval_accuracy), evaluated(|e| e.eval_score_mean));
    // Accuracy where the reward source has a notion of correct, else the mean score.
    let held_out = if !accuracy.is_empty() {
        Some((
            Series::new("eval_accuracy", "held-out accuracy (greedy)", c[3], accuracy),
            "accuracy (0–1)",
        ))
    } else if !score.is_empty() {
        Some((
            Series::new("eval_score_mean", "held-out score (greedy)", c[3], score),
            "score per response",
        ))
    } else {
        None
    };
    if let Some((series, y_label)) = held_out {
        figs.insert(
            1,
            Figure {
                id: "chart-eval",
                title: "Held-out evaluation",
                caption: "Greedy responses of the weights published after the step, on the [eval] prompts, \
                          scored by the run's reward source."
                    .into(),
                wide: false,
                panels: vec![panel(y_label, zero(), vec![series])],
                note: None,
            },
        );
    }
    for panel in figs
        .iter_mut()
        .flat_map(|f| f.panels.iter_mut())
        .filter(|p| p.x_integer)
    {
        panel.markers = d
            .resumed_at
            .iter()
            .map(|&k| (k as f64, format!("resumed at step {k}")))
            .collect();
    }
    figs
}

//! The `peft:` block as written: one method and its keys, parsed through a flat mapping so an
//! unknown or misplaced key is reported at its line (serde loses positions inside internally
//! tagged enums), with each key checked against the methods that take it.

use serde::{Deserialize, Serialize};

use super::{
    Activation, AdaloraConfig, BottleneckConfig, EncoderKind, PrefixConfig, PromptConfig,
    PtuningConfig,
};

/// Parsed through [`PeftSpec`], a flat mapping, so an unknown or misplaced key is reported at
/// its line (serde loses positions inside internally tagged enums).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", try_from = "PeftSpec")]
pub enum PeftConfig {
    Lora(LoraConfig),
    /// LoRA over an NF4-quantised frozen base.
    Qlora(LoraConfig),
    /// SVD-shaped LoRA whose rank budget is reallocated by importance while training.
    Adalora(AdaloraConfig),
    /// Prompt tuning: learned virtual tokens before every input.
    Prompt(PromptConfig),
    /// Prefix tuning / P-tuning v2: learned keys and values in every layer.
    Prefix(PrefixConfig),
    /// P-tuning: virtual tokens produced by a prompt encoder (MLP or LSTM) while training.
    Ptuning(PtuningConfig),
    /// Bottleneck adapters after attention and MLP (Houlsby), with AdapterDrop.
    Adapter(BottleneckConfig),
    Freeze(FreezeConfig),
    /// Feature-based training: the backbone frozen, only the scalar head (reward model,
    /// critic) or an untied LM head trained.
    Head,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// No bias trained (PEFT's default).
    #[default]
    None,
    /// Every bias of the model trained and saved with the adapter.
    All,
    /// The biases of the adapted layers.
    LoraOnly,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// A ~ Kaiming-uniform (bound 1/√in), B = 0: the adapter starts as the identity.
    #[default]
    Default,
    /// A ~ N(0, 1/r), B = 0.
    Gaussian,
    /// PiSSA: A and B from the top-r singular values and vectors of the frozen weight, which
    /// keeps the residual; saved converted to a plain LoRA of rank 2r over the original base.
    Pissa,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank.
    pub r: i64,
    /// Scale numerator: updates are scaled by alpha/r (alpha/√r with rslora). Default 2r.
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub dropout: f64,
    /// Hugging Face module names (`c_attn`, `q_proj`…), matched as PEFT does: the module's
    /// name or the end of its path. Default: every dense layer of the blocks.
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// Only these blocks (0-based); default all.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    #[serde(default)]
    pub bias: LoraBias,
    #[serde(default)]
    pub rslora: bool,
    #[serde(default)]
    pub dora: bool,
    #[serde(default)]
    pub init: LoraInit,
    /// QLoRA only: quantise the NF4 block maxima to 8 bits too (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub double_quant: Option<bool>,
}

impl PeftConfig {
    /// Why this method cannot train with activation checkpointing (`checkpoint`) or a chunked
    /// loss, if it cannot.
    pub fn memory_saving_conflict(&self, checkpoint: bool) -> Option<&'static str> {
        let dropout = match self {
            PeftConfig::Prompt(_) | PeftConfig::Prefix(_) | PeftConfig::Ptuning(_) => {
                return Some(
                    "virtual tokens (prompt, prefix and P-tuning) do not combine with \
                     activation_checkpointing or loss_chunk",
                )
            }
            PeftConfig::Lora(c) | PeftConfig::Qlora(c) => c.dropout,
            PeftConfig::Adalora(c) => c.dropout,
            _ => 0.0,
        };
        (checkpoint && dropout > 0.0).then_some(
            "adapter dropout would draw new masks when a block is recomputed; set the adapter's \
             dropout to 0 to use activation_checkpointing",
        )
    }

    /// Every check of the settings that needs no model: each stage's config check runs it
    /// ([`check_peft`]), so `--validate` reports it at its line before any stage runs, and
    /// [`super::apply`] runs it again for configs built in code. The checks against the model
    /// (target modules, layer counts, the model's width and positions) are `apply`'s.
    pub fn check_settings(&self) -> Result<(), PeftError> {
        match self {
            PeftConfig::Lora(c) | PeftConfig::Qlora(c) => {
                if c.r <= 0 {
                    return Err(bad("r", "must be a positive rank"));
                }
                if !(0.0..1.0).contains(&c.dropout) {
                    return Err(bad("dropout", "must be in [0, 1)"));
                }
                if c.alpha.is_some_and(|a| !a.is_finite()) {
                    return Err(bad("alpha", "must be a finite number"));
                }
                if c.init == LoraInit::Pissa && c.dora {
                    return Err(bad(
                        "init",
                        "pissa cannot be combined with dora (the magnitude would be taken from the residual weight); use one of them",
                    ));
                }
                Ok(())
            }
            PeftConfig::Adalora(c) => c.check(),
            PeftConfig::Prompt(c) => virtual_tokens_in_range(c.num_virtual_tokens),
            PeftConfig::Prefix(c) => {
                virtual_tokens_in_range(c.num_virtual_tokens)?;
                if c.encoder_hidden_size.is_some() && !c.projection {
                    return Err(bad(
                        "encoder_hidden_size",
                        "only used with `projection: true`",
                    ));
                }
                positive_hidden(c.encoder_hidden_size)
            }
            PeftConfig::Ptuning(c) => {
                virtual_tokens_in_range(c.num_virtual_tokens)?;
                positive_hidden(c.encoder_hidden_size)
            }
            PeftConfig::Adapter(c) if c.reduction < 1 => Err(bad(
                "reduction",
                "must be at least 1 (the model's width over the bottleneck's)",
            )),
            PeftConfig::Freeze(c) if c.trainable.is_empty() && c.top_layers.is_none() => Err(bad(
                "trainable",
                "freeze needs `trainable` patterns or `top_layers`",
            )),
            PeftConfig::Freeze(c) if c.top_layers == Some(0) => {
                Err(bad("top_layers", "must be at least 1"))
            }
            PeftConfig::Adapter(_) | PeftConfig::Freeze(_) | PeftConfig::Head => Ok(()),
        }
    }

    /// The adapter settings of `lora` and `qlora`.
    pub fn lora(&self) -> Option<&LoraConfig> {
        match self {
            PeftConfig::Lora(c) | PeftConfig::Qlora(c) => Some(c),
            _ => None,
        }
    }
}

impl LoraConfig {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.r as f64)
    }

    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha() / (self.r as f64).sqrt()
        } else {
            self.alpha() / self.r as f64
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    /// Parameter-name patterns to train (`*` matches any run of characters), e.g.
    /// `["*.ln_*", "transformer.h.3.*"]`.
    #[serde(default)]
    pub trainable: Vec<String>,
    /// Train the top k blocks (and the final norm).
    #[serde(default)]
    pub top_layers: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Method {
    Lora,
    Qlora,
    Adalora,
    Prompt,
    Prefix,
    Ptuning,
    Adapter,
    Freeze,
    Head,
}

/// The `peft:` block as written: every method's keys, checked against the method.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeftSpec {
    method: Method,
    r: Option<i64>,
    alpha: Option<f64>,
    dropout: Option<f64>,
    target_modules: Option<Vec<String>>,
    layers: Option<Vec<usize>>,
    bias: Option<LoraBias>,
    rslora: Option<bool>,
    dora: Option<bool>,
    init: Option<LoraInit>,
    double_quant: Option<bool>,
    init_r: Option<i64>,
    target_r: Option<i64>,
    tinit: Option<usize>,
    tfinal: Option<usize>,
    delta_t: Option<usize>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    orth_reg_weight: Option<f64>,
    total_step: Option<usize>,
    trainable: Option<Vec<String>>,
    top_layers: Option<usize>,
    num_virtual_tokens: Option<i64>,
    init_text: Option<String>,
    projection: Option<bool>,
    encoder_hidden_size: Option<i64>,
    encoder: Option<EncoderKind>,
    reduction: Option<i64>,
    activation: Option<Activation>,
    drop_layers: Option<usize>,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Qlora => "qlora",
            Method::Adalora => "adalora",
            Method::Prompt => "prompt",
            Method::Prefix => "prefix",
            Method::Ptuning => "ptuning",
            Method::Adapter => "adapter",
            Method::Freeze => "freeze",
            Method::Head => "head",
        }
    }
}

impl PeftSpec {
    /// The first key set for a method that does not take it, named with the method it belongs
    /// to.
    fn misplaced_key(&self) -> Result<(), String> {
        use Method::*;
        const LORA: &[Method] = &[Lora, Qlora];
        const LOW_RANK: &[Method] = &[Lora, Qlora, Adalora];
        const VIRTUAL: &[Method] = &[Prompt, Ptuning, Prefix];
        let s = self;
        if s.method == Adalora && s.r.is_some() {
            return Err("adalora sets its ranks with `init_r` and `target_r`, not `r`".to_string());
        }
        // Every key and the methods that take it; the first key given to another method is
        // named with its owner.
        let keys: [(&str, bool, &[Method]); 29] = [
            ("r", s.r.is_some(), LORA),
            ("alpha", s.alpha.is_some(), LOW_RANK),
            ("dropout", s.dropout.is_some(), LOW_RANK),
            ("target_modules", s.target_modules.is_some(), LOW_RANK),
            ("layers", s.layers.is_some(), LOW_RANK),
            ("init_r", s.init_r.is_some(), &[Adalora]),
            ("target_r", s.target_r.is_some(), &[Adalora]),
            ("tinit", s.tinit.is_some(), &[Adalora]),
            ("tfinal", s.tfinal.is_some(), &[Adalora]),
            ("delta_t", s.delta_t.is_some(), &[Adalora]),
            ("beta1", s.beta1.is_some(), &[Adalora]),
            ("beta2", s.beta2.is_some(), &[Adalora]),
            ("orth_reg_weight", s.orth_reg_weight.is_some(), &[Adalora]),
            ("total_step", s.total_step.is_some(), &[Adalora]),
            ("bias", s.bias.is_some(), LORA),
            ("rslora", s.rslora.is_some(), LORA),
            ("dora", s.dora.is_some(), LORA),
            ("init", s.init.is_some(), LORA),
            ("double_quant", s.double_quant.is_some(), &[Qlora]),
            ("trainable", s.trainable.is_some(), &[Freeze]),
            ("top_layers", s.top_layers.is_some(), &[Freeze]),
            (
                "num_virtual_tokens",
                s.num_virtual_tokens.is_some(),
                VIRTUAL,
            ),
            ("init_text", s.init_text.is_some(), &[Prompt]),
            ("projection", s.projection.is_some(), &[Prefix]),
            (
                "encoder_hidden_size",
                s.encoder_hidden_size.is_some(),
                &[Prefix, Ptuning],
            ),
            ("encoder", s.encoder.is_some(), &[Ptuning]),
            ("reduction", s.reduction.is_some(), &[Adapter]),
            ("activation", s.activation.is_some(), &[Adapter]),
            ("drop_layers", s.drop_layers.is_some(), &[Adapter]),
        ];
        if let Some((k, _, owners)) = keys
            .iter()
            .find(|(_, set, owners)| *set && !owners.contains(&s.method))
        {
            return Err(if s.method == Head {
                format!("method head takes no settings (got `{k}`)")
            } else {
                format!(
                    "`{k}` belongs to method {}, not {}",
                    owners[0].name(),
                    s.method.name()
                )
            });
        }
        Ok(())
    }
}

impl TryFrom<PeftSpec> for PeftConfig {
    type Error = String;

    fn try_from(s: PeftSpec) -> Result<Self, String> {
        use Method::*;
        s.misplaced_key()?;
        let virtual_tokens = || {
            s.num_virtual_tokens.ok_or(format!(
                "method {} needs `num_virtual_tokens`",
                s.method.name()
            ))
        };
        let config = match s.method {
            Lora | Qlora => {
                let c = LoraConfig {
                    r: s.r
                        .ok_or(format!("method {} needs a rank `r`", s.method.name()))?,
                    alpha: s.alpha,
                    dropout: s.dropout.unwrap_or(0.0),
                    target_modules: s.target_modules,
                    layers: s.layers,
                    bias: s.bias.unwrap_or_default(),
                    rslora: s.rslora.unwrap_or(false),
                    dora: s.dora.unwrap_or(false),
                    init: s.init.unwrap_or_default(),
                    double_quant: s.double_quant,
                };
                if s.method == Lora {
                    PeftConfig::Lora(c)
                } else {
                    PeftConfig::Qlora(c)
                }
            }
            Adalora => PeftConfig::Adalora(AdaloraConfig {
                init_r: s.init_r.unwrap_or(12),
                target_r: s.target_r.unwrap_or(8),
                alpha: s.alpha.unwrap_or(8.0),
                dropout: s.dropout.unwrap_or(0.0),
                target_modules: s.target_modules,
                layers: s.layers,
                tinit: s.tinit.unwrap_or(0),
                tfinal: s.tfinal.unwrap_or(0),
                delta_t: s.delta_t.unwrap_or(1),
                beta1: s.beta1.unwrap_or(0.85),
                beta2: s.beta2.unwrap_or(0.85),
                orth_reg_weight: s.orth_reg_weight.unwrap_or(0.5),
                total_step: s.total_step,
            }),
            Prompt => PeftConfig::Prompt(PromptConfig {
                num_virtual_tokens: virtual_tokens()?,
                init_text: s.init_text,
            }),
            Prefix => PeftConfig::Prefix(PrefixConfig {
                num_virtual_tokens: virtual_tokens()?,
                projection: s.projection.unwrap_or(false),
                encoder_hidden_size: s.encoder_hidden_size,
            }),
            Ptuning => PeftConfig::Ptuning(PtuningConfig {
                num_virtual_tokens: virtual_tokens()?,
                encoder: s.encoder.unwrap_or_default(),
                encoder_hidden_size: s.encoder_hidden_size,
            }),
            Adapter => PeftConfig::Adapter(BottleneckConfig {
                reduction: s.reduction.unwrap_or(16),
                activation: s.activation.unwrap_or_default(),
                drop_layers: s.drop_layers.unwrap_or(0),
            }),
            Freeze => PeftConfig::Freeze(FreezeConfig {
                trainable: s.trainable.unwrap_or_default(),
                top_layers: s.top_layers,
            }),
            Head => PeftConfig::Head,
        };
        Ok(config)
    }
}

/// A stage's `peft`-like key (`peft`, `critic_peft`) checked with [`PeftConfig::check_settings`],
/// the problem named at its key in the stage's config.
pub fn check_peft<T>(
    cfg: &temper_stage::ConfigFile<T>,
    key: &str,
    peft: Option<&PeftConfig>,
) -> Result<(), temper_stage::StageError> {
    match peft.map(PeftConfig::check_settings) {
        Some(Err(e)) => Err(cfg.error(&e.field.replacen("peft", key, 1), e.message)),
        _ => Ok(()),
    }
}

/// Virtual tokens beyond this many are almost certainly a typo (PEFT's examples use 8–32).
const MAX_VIRTUAL_TOKENS: i64 = 1024;

fn virtual_tokens_in_range(n: i64) -> Result<(), PeftError> {
    if (1..=MAX_VIRTUAL_TOKENS).contains(&n) {
        Ok(())
    } else {
        Err(bad(
            "num_virtual_tokens",
            format!("must be in 1..={MAX_VIRTUAL_TOKENS}"),
        ))
    }
}

fn positive_hidden(h: Option<i64>) -> Result<(), PeftError> {
    if h.is_some_and(|h| h <= 0) {
        Err(bad("encoder_hidden_size", "must be positive"))
    } else {
        Ok(())
    }
}

/// A `peft:` problem, named by its key under `peft`.
#[derive(Debug)]
pub struct PeftError {
    pub field: String,
    pub message: String,
}

pub(crate) fn bad(field: &str, message: impl Into<String>) -> PeftError {
    PeftError {
        field: format!("peft.{field}"),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<PeftConfig, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn qlora_parses_as_lora_with_double_quantisation_by_default() {
        let c = parse("{method: qlora, r: 8}").unwrap();
        let PeftConfig::Qlora(l) = &c else {
            panic!("{c:?}")
        };
        assert_eq!((l.r, l.double_quant), (8, None));
        assert_eq!(c.lora().map(|l| l.scale()), Some(2.0));
        // Written and read back unchanged (temper_adapter.json keeps the full config).
        let off = parse("{method: qlora, r: 4, double_quant: false}").unwrap();
        let text = serde_yaml::to_string(&off).unwrap();
        assert_eq!(parse(&text).unwrap(), off, "{text}");
    }

    #[test]
    fn keys_of_another_method_are_named() {
        let e = parse("{method: lora, r: 4, double_quant: true}").unwrap_err();
        assert!(e.contains("`double_quant` belongs to method qlora"), "{e}");
        let e = parse("{method: qlora}").unwrap_err();
        assert!(e.contains("method qlora needs a rank"), "{e}");
        let e = parse("{method: qlora, r: 4, top_layers: 1}").unwrap_err();
        assert!(e.contains("belongs to method freeze"), "{e}");
        let e = parse("{method: prompt, num_virtual_tokens: 8, r: 4}").unwrap_err();
        assert!(e.contains("`r` belongs to method lora, not prompt"), "{e}");
        let e = parse("{method: lora, r: 4, init_text: hi}").unwrap_err();
        assert!(e.contains("`init_text` belongs to method prompt"), "{e}");
        let e = parse("{method: prefix, num_virtual_tokens: 8, init_text: hi}").unwrap_err();
        assert!(e.contains("`init_text` belongs to method prompt"), "{e}");
        let e = parse("{method: lora, r: 2, drop_layers: 1}").unwrap_err();
        assert!(e.contains("`drop_layers` belongs to method adapter"), "{e}");
        let e = parse("{method: adapter, r: 2}").unwrap_err();
        assert!(e.contains("`r` belongs to method lora, not adapter"), "{e}");
        let p = parse("{method: adapter, reduction: 8, activation: gelu, drop_layers: 2}").unwrap();
        assert_eq!(parse(&serde_yaml::to_string(&p).unwrap()).unwrap(), p);
        let e = parse("{method: adalora, r: 4}").unwrap_err();
        assert!(e.contains("`init_r` and `target_r`, not `r`"), "{e}");
        let e = parse("{method: lora, r: 4, tinit: 3}").unwrap_err();
        assert!(e.contains("`tinit` belongs to method adalora"), "{e}");
        let p = parse("{method: adalora, init_r: 6, target_r: 2, tinit: 5, delta_t: 3}").unwrap();
        assert_eq!(parse(&serde_yaml::to_string(&p).unwrap()).unwrap(), p);
        let e = parse("{method: lora, r: 2, encoder: lstm}").unwrap_err();
        assert!(e.contains("`encoder` belongs to method ptuning"), "{e}");
        let p = parse("{method: ptuning, num_virtual_tokens: 4, encoder: lstm}").unwrap();
        assert_eq!(parse(&serde_yaml::to_string(&p).unwrap()).unwrap(), p);
        let e = parse("{method: prompt, num_virtual_tokens: 8, projection: true}").unwrap_err();
        assert!(e.contains("`projection` belongs to method prefix"), "{e}");
        let p = parse("{method: prefix, num_virtual_tokens: 8, projection: true}").unwrap();
        assert_eq!(parse(&serde_yaml::to_string(&p).unwrap()).unwrap(), p);
        let p = parse("{method: prompt, num_virtual_tokens: 8, init_text: hi}").unwrap();
        let text = serde_yaml::to_string(&p).unwrap();
        assert_eq!(parse(&text).unwrap(), p, "{text}");
    }

    #[test]
    fn settings_that_need_no_model_are_checked_alone() {
        let problem = |yaml: &str| parse(yaml).unwrap().check_settings().err().map(|e| e.field);
        for (yaml, field) in [
            ("{method: lora, r: 0}", "peft.r"),
            ("{method: qlora, r: 4, dropout: 1.0}", "peft.dropout"),
            ("{method: lora, r: 4, dora: true, init: pissa}", "peft.init"),
            ("{method: adalora, init_r: 4, target_r: 4}", "peft.target_r"),
            (
                "{method: prompt, num_virtual_tokens: 0}",
                "peft.num_virtual_tokens",
            ),
            (
                "{method: prefix, num_virtual_tokens: 4, encoder_hidden_size: 8}",
                "peft.encoder_hidden_size",
            ),
            (
                "{method: ptuning, num_virtual_tokens: 4, encoder_hidden_size: -1}",
                "peft.encoder_hidden_size",
            ),
            ("{method: adapter, reduction: 0}", "peft.reduction"),
            ("{method: freeze}", "peft.trainable"),
            ("{method: freeze, top_layers: 0}", "peft.top_layers"),
        ] {
            assert_eq!(problem(yaml).as_deref(), Some(field), "{yaml}");
        }
        for yaml in [
            "{method: lora, r: 4, dropout: 0.1}",
            "{method: freeze, top_layers: 1}",
            "{method: head}",
        ] {
            assert_eq!(problem(yaml), None, "{yaml}");
        }
    }
}

//! Scoring generated sequences, shared by every stage that samples: response log-probs under
//! a causal LM, critic values, reward-model scores, and the replies back as text. Shapes: B
//! sequences of P prompt columns (left-padded) then N response columns.

use tch::{Kind, Tensor};
use temper_data::TextTokenizer;

use crate::error::Result;
use crate::losses::token_logprobs;
use crate::model::Transformer;
use crate::sample::Joined;

/// Log-probs (B, N) of the response `tokens` under `model` at `temperature`, and the logits
/// (B, N, V) they come from. `seq`, `attn`: (B, P + N); `p` = P.
pub fn response_logprobs(
    model: &Transformer,
    seq: &Tensor,
    attn: &Tensor,
    p: i64,
    tokens: &Tensor,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let n = tokens.size()[1];
    let hidden = model.hidden_states(seq, Some(attn), None)?;
    // Position p-1+t predicts response token t.
    let logits = model
        .logits(&hidden.narrow(1, p - 1, n))?
        .to_kind(Kind::Float)
        / temperature;
    Ok((token_logprobs(&logits, tokens), logits))
}

/// Critic values (B, N) of the states before each response token.
pub fn response_values(
    critic: &Transformer,
    seq: &Tensor,
    attn: &Tensor,
    p: i64,
    n: i64,
) -> Result<Tensor> {
    let hidden = critic.hidden_states(seq, Some(attn), None)?;
    Ok(critic
        .scores(&hidden)?
        .narrow(1, p - 1, n)
        .to_kind(Kind::Float))
}

/// One reward-model score per sequence (B,), pooled as the model was trained.
pub fn reward_scores(reward: &Transformer, joined: &Joined) -> Result<Tensor> {
    let hidden = reward.hidden_states(&joined.seq, Some(&joined.attention), None)?;
    Ok(reward
        .sequence_scores(&hidden, &joined.attention, &joined.response)?
        .to_kind(Kind::Float))
}

/// Each row's completion log-prob (the tokens with `loss_mask` 1, summed) and its token count,
/// both (B,): ids, attention, loss_mask (B, T). Token t is predicted at position t − 1.
pub fn completion_logps(
    model: &Transformer,
    ids: &Tensor,
    attention: &Tensor,
    loss_mask: &Tensor,
    precision: crate::Precision,
) -> Result<(Tensor, Tensor)> {
    let t = ids.size()[1];
    let lp = crate::with_autocast(model.device(), precision, || -> Result<Tensor> {
        let (_, logits) = model.forward(ids, Some(attention))?;
        Ok(token_logprobs(
            &logits.narrow(1, 0, t - 1),
            &ids.narrow(1, 1, t - 1),
        ))
    })??; // (B, T − 1)
    let mask = loss_mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    Ok((
        (lp * &mask).sum_dim_intlist(1, false, Kind::Float),
        mask.sum_dim_intlist(1, false, Kind::Float),
    ))
}

/// A generated reply as text.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// The reply without its EOS.
    pub text: String,
    pub ids: Vec<u32>,
    /// Whether the reply ended with EOS or another stop token of the template (rather than
    /// running out of tokens).
    pub ended_with_eos: bool,
}

/// The replies of a generation: `tokens` (B, N) with `mask` (B, N) marking real tokens;
/// `stops` the tokens that end a reply (EOS first), left out of the text.
pub fn decode_replies(
    tok: &TextTokenizer,
    tokens: &Tensor,
    mask: &Tensor,
    stops: &[u32],
) -> Result<Vec<Reply>> {
    let rows = tokens.size()[0];
    let mut out = Vec::with_capacity(rows as usize);
    for i in 0..rows {
        let toks = Vec::<i64>::try_from(tokens.get(i))?;
        let m = Vec::<bool>::try_from(mask.get(i).to_kind(Kind::Bool))?;
        let real = toks
            .iter()
            .zip(&m)
            .filter(|(_, &k)| k)
            .map(|(&t, _)| t as u32);
        let ended_with_eos = real.clone().any(|t| stops.contains(&t));
        let ids: Vec<u32> = real.filter(|t| !stops.contains(t)).collect();
        out.push(Reply {
            text: tok
                .decode(&ids)
                .map_err(|e| crate::CoreError::Shape(e.to_string()))?,
            ids,
            ended_with_eos,
        });
    }
    Ok(out)
}

/// The prompts of a generation as text: `prompt` (B, P) left-padded, `mask` (B, P).
pub fn decode_prompts(tok: &TextTokenizer, prompt: &Tensor, mask: &Tensor) -> Result<Vec<String>> {
    let rows = prompt.size()[0];
    (0..rows)
        .map(|i| {
            let toks = Vec::<i64>::try_from(prompt.get(i))?;
            let m = Vec::<bool>::try_from(mask.get(i).to_kind(Kind::Bool))?;
            let ids: Vec<u32> = toks
                .iter()
                .zip(&m)
                .filter(|(_, &k)| k)
                .map(|(&t, _)| t as u32)
                .collect();
            tok.decode(&ids)
                .map_err(|e| crate::CoreError::Shape(e.to_string()))
        })
        .collect()
}

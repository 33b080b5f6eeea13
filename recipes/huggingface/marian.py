"""A Hugging Face MarianMTModel compressed with this library's callbacks: the client of the
protocols in docs/using_callbacks.md that is not ours.

    pip install -e '.[huggingface]'
    python recipes/huggingface/marian.py --out runs/marian

``MarianTranslation`` is a LightningModule of a few dozen lines around ``MarianMTModel``
(random weights from a small ``MarianConfig``, no download): the loss-term protocol for the
distillation callbacks and the feature protocol (per-layer hidden states and attention
probabilities from Hugging Face's outputs) for layer-wise transfer. ``main`` trains it on a toy
task (reverse the token sequence) with QAT, Quant-Noise, iPQ and a lottery ticket composed,
then distils a larger Marian teacher into it, exports the compressed model with
``export_module`` and checks that the file, loaded into a fresh instance, translates alike.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import MarianConfig, MarianMTModel

PAD, EOS, FIRST = 0, 1, 2  # pad doubles as the decoder's start token, as in Marian
TASK_LOSS = "cross_entropy"
# Hugging Face's Marian names: the sinusoidal position tables are nn.Embedding subclasses with
# fixed weights, which no callback should touch.
POSITIONS = "*embed_positions*"
LAYERS = {"encoder": "model.model.encoder.layers", "decoder": "model.model.decoder.layers"}
EMBEDDINGS = {"encoder": ["model.model.shared"], "decoder": []}  # one table, tied to the output projection


class MarianFeatures:
    """The feature protocol, filled from Hugging Face's outputs: states index 0 the embeddings,
    l the output of layer l; attention lists index l - 1 for layer l, (batch, heads, queries, keys)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self.encoder_states: list[torch.Tensor] = []
        self.decoder_states: list[torch.Tensor] = []
        self.encoder_self_attention: list[torch.Tensor] = []
        self.decoder_self_attention: list[torch.Tensor] = []
        self.cross_attention: list[torch.Tensor] = []
        self.encoder_output: Optional[torch.Tensor] = None
        self.decoder_output: Optional[torch.Tensor] = None

    @classmethod
    def requesting(cls, names: Iterable[str]) -> "MarianFeatures":
        return cls(names)

    def fill(self, output: Any) -> None:
        if "hidden_states" in self.names:
            self.encoder_states, self.decoder_states = list(output.encoder_hidden_states), list(output.decoder_hidden_states)
            self.encoder_output, self.decoder_output = self.encoder_states[-1], self.decoder_states[-1]  # post-norm
        if "attention" in self.names:
            self.encoder_self_attention = list(output.encoder_attentions)
            self.decoder_self_attention = list(output.decoder_attentions)
            self.cross_attention = list(output.cross_attentions)


class MarianTranslation(L.LightningModule):
    """MarianMTModel with the loss-term protocol; batches are (source, target) token ids."""

    def __init__(self, vocab_size: int = 40, d_model: int = 32, layers: int = 2, heads: int = 2, ffn_dim: int = 64,
                 lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()  # the distillation callbacks' default loader rebuilds a teacher from them
        self.model = MarianMTModel(MarianConfig(
            vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn_dim,
            decoder_ffn_dim=ffn_dim, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
            decoder_start_token_id=PAD, attn_implementation="eager"))
        self.hidden_size = d_model
        self.terms: dict[str, list] = {}
        self.weights = {TASK_LOSS: 1.0}

    def forward(self, source: torch.Tensor, decoder_input: torch.Tensor,
                features: Optional[MarianFeatures] = None) -> torch.Tensor:
        wanted = features.names if features is not None else set()
        output = self.model(input_ids=source, attention_mask=source != PAD, decoder_input_ids=decoder_input,
                            output_hidden_states="hidden_states" in wanted, output_attentions="attention" in wanted)
        if features is not None:
            features.fill(output)
        return output.logits

    # the loss-term protocol
    def register_loss_term(self, name: str, fn: Any, weight: float = 1.0, features: Iterable[str] = ()) -> None:
        self.terms[name] = [fn, float(weight), set(features)]

    def remove_loss_term(self, name: str) -> None:
        self.terms.pop(name, None)

    def set_loss_weight(self, name: str, weight: float) -> None:
        if name == TASK_LOSS:
            self.weights[TASK_LOSS] = float(weight)
        else:
            self.terms[name][1] = float(weight)

    def loss_weight(self, name: str) -> float:
        return self.weights[TASK_LOSS] if name == TASK_LOSS else self.terms[name][1]

    def training_step(self, batch: tuple, batch_index: int) -> torch.Tensor:
        source, target = batch
        decoder_input = torch.cat([torch.full_like(target[:, :1], PAD), target[:, :-1]], dim=1)
        wanted = set().union(*(term[2] for term in self.terms.values()))
        features = MarianFeatures.requesting(wanted) if wanted else None
        logits = self(source, decoder_input, features)
        mask = target != PAD
        tokens = mask.sum()
        loss = self.weights[TASK_LOSS] * nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
        context = SimpleNamespace(module=self, batch={"source": source, "decoder_input": decoder_input}, logits=logits,
                                  target_mask=mask, source_mask=source != PAD, num_tokens=tokens, features=features)
        for name, (fn, weight, _) in self.terms.items():
            loss = loss + weight * fn(context)
        return loss / tokens

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def greedy(self, source: torch.Tensor, length: int) -> torch.Tensor:
        """Greedy decoding of ``length`` tokens (the toy task's outputs are as long as its inputs)."""
        output = torch.full((source.shape[0], 1), PAD, dtype=torch.long)
        for _ in range(length):
            output = torch.cat([output, self(source, output)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return output[:, 1:]


def reversal_data(samples: int = 256, length: int = 6, vocab_size: int = 40, seed: int = 0,
                  batch_size: int = 16) -> DataLoader:
    """Sources of random tokens; each target is its source reversed, then eos."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(FIRST, vocab_size, (samples, length), generator=generator)
    source = torch.cat([source, torch.full((samples, 1), EOS)], dim=1)
    target = torch.cat([source[:, :-1].flip(1), torch.full((samples, 1), EOS)], dim=1)
    return DataLoader(TensorDataset(source, target), batch_size=batch_size, shuffle=False)


def compression_callbacks(steps_per_stage: int) -> list[L.Callback]:
    """QAT, Quant-Noise, iPQ and a lottery ticket on Marian's layers, composed."""
    from callbacks import IterativeProductQuantization, LotteryTicketPruning, QuantizationAwareTraining, QuantNoise

    ffn = ["model.model.*.fc1", "model.model.*.fc2"]
    return [LotteryTicketPruning(sparsity=0.5, rounds=1, round_steps=steps_per_stage, rewind_step=1,
                                 include=["model.model.*_attn.*"]),
            QuantNoise(p=0.1, scheme="pq", block_size=4, include=ffn, exclude=[POSITIONS]),
            IterativeProductQuantization(steps_per_stage=steps_per_stage, stages=[ffn], centroids=16, block_size=4,
                                         block_sizes={}),
            QuantizationAwareTraining(include=["model.model.*_attn.*"], exclude=[POSITIONS], quantize_embeddings=False)]


def main(argv: Optional[list[str]] = None) -> None:
    from callbacks import KnowledgeDistillation
    from nmt_lightning.export import export_module, load_module

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/marian"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = reversal_data()
    L.seed_everything(0)
    teacher = MarianTranslation(d_model=64, layers=3, heads=4, ffn_dim=128)
    fit = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, default_root_dir=str(args.out))
    fit.fit(teacher, data)
    fit.save_checkpoint(args.out / "teacher.ckpt")
    student = MarianTranslation()
    callbacks = [KnowledgeDistillation(str(args.out / "teacher.ckpt"), teacher_inputs=["source", "decoder_input"]),
                 *compression_callbacks(args.steps // 2)]
    fit = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, default_root_dir=str(args.out),
                    callbacks=callbacks)
    fit.fit(student, data)
    fit.save_checkpoint(args.out / "student.ckpt")
    report = export_module(args.out / "student.ckpt", MarianTranslation(), args.out / "student.safetensors")
    loaded = load_module(MarianTranslation(), args.out / "student.safetensors")
    source, target = next(iter(reversal_data(samples=64, seed=1, batch_size=64)))
    student.eval()
    for name, model in (("teacher", teacher.eval()), ("compressed student, in training", student),
                        ("compressed student, from the file", loaded)):
        accuracy = (model.greedy(source, target.shape[1]) == target).float().mean()
        print(f"{name}: token accuracy {accuracy:.3f}")
    print(f"{report.output}: {report.bytes_on_disk:,} bytes ({report.quantization}); the weights in fp32: "
          f"{report.weight_bytes_fp32:,} bytes")


if __name__ == "__main__":
    main()

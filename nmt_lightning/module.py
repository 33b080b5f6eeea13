"""``TranslationModule``: the Transformer as a LightningModule (loss, optimiser, metrics, search)."""

from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import SumMetric
from torchmetrics.text import CHRFScore, SacreBLEUScore

from compression_contract.protocols import TASK_LOSS
from nmt_lightning.bpe import PAD_ID
from nmt_lightning.checkpoint_reading import PARAMETRIZED, model_weights, read_checkpoint
from nmt_lightning.decoding import beam_search, greedy_search
from nmt_lightning.errors import ModelFileError
from nmt_lightning.evaluation import score
from nmt_lightning.export.module_file import encode_module_checkpoint, fill_module
from nmt_lightning.model import FEATURE_NAMES, Transformer, TransformerFeatures, config_from_hyperparameters
from nmt_lightning.model.initialization import initialize_from_teacher
from nmt_lightning.tokenization import Tokenization

CROSS_ENTROPY = TASK_LOSS  # the name of the label-smoothed loss in set_loss_weight (the contract's)


@dataclass
class LossContext:
    """What a loss term sees of one training batch (B sentences, T target positions, V words).

    logits: (B, T, V); target: (B, T) ids, padded with pad; target_mask: (B, T) bool, True at
    real target tokens; num_tokens: () this batch's target tokens (on this rank); features:
    the per-layer tensors the registered terms asked for (None when none did); source_mask:
    (B, S) bool, True at real source tokens (the encoder's positions).
    """

    module: "TranslationModule"
    batch: dict
    logits: torch.Tensor
    target: torch.Tensor
    target_mask: torch.Tensor
    num_tokens: torch.Tensor
    features: Optional[TransformerFeatures]
    source_mask: Optional[torch.Tensor] = None


# fn(context) -> a scalar: the term SUMMED over the batch's target tokens (a per-token mean
# times context.num_tokens, if that is what it computes). The module divides the sum of all
# terms by the target tokens of the whole update, as it does the cross-entropy.
LossTerm = Callable[[LossContext], torch.Tensor]


@dataclass
class _RegisteredTerm:
    fn: LossTerm
    weight: float
    features: frozenset[str]


class TranslationModule(L.LightningModule):
    """Trains a Transformer with label-smoothed cross-entropy and Adam with inverse-sqrt warm-up.

    Architecture: ``preset`` ("tiny", "base", "big", or "tiny-bottleneck", a MobileBERT-style
    deep and thin student) with any field overridden by the optional arguments
    (``bottleneck_dim``, ``stacked_ffn``, ``embedding_dim``: see ``TransformerConfig``).
    Vocabulary sizes are linked from the data module by the CLI.

    Validation logs the token-level loss and, with ``val_bleu``, BLEU and chrF2 of greedy
    translations of the first ``val_bleu_sentences`` validation sentences (all if None);
    torchmetrics keeps sufficient statistics, so the corpus scores are exact under DDP.
    Test decodes with beam search, writes the hypotheses (in input order) to
    ``test_output`` (default: ``<log dir>/test.hyp.<tgt>``) and scores them with sacrebleu.

    The training objective of one optimiser update is, over all its target tokens (every DDP
    rank, every accumulated batch: fairseq's normalisation, so a half-full batch weighs half)::

        (w_ce * label-smoothed cross-entropy + sum_i w_i * term_i) / target tokens

    Extension point for compression callbacks: ``register_loss_term(name, fn, weight,
    features)`` adds ``weight * fn(context)`` (a ``LossContext``; ``fn`` returns a sum over the
    batch's target tokens), logged per token as ``train/<name>``; ``features`` asks the forward
    pass for per-layer hidden states and/or attention probabilities. ``set_loss_weight(name,
    w)`` rescales a term, the cross-entropy included (``"cross_entropy"``: the alpha of a
    distillation loss).

    ``init_from`` starts from the weights of another checkpoint of the same architecture (a
    fine-tuning run, e.g. quantization-aware fine-tuning): unlike ``ckpt_path``, the optimiser,
    the schedule and the step count start afresh. With ``init_layers`` the checkpoint may be a
    deeper model of the same width (a distillation teacher): ``"every_other"`` copies its layers
    1, 3, 5, ... into a student half as deep, ``{encoder: [...], decoder: [...]}`` the listed
    layers; embeddings, output projection and final norms are copied too
    (``nmt_lightning.model.initialization``). ``"none"`` copies only those, for a student whose
    blocks differ (a bottleneck student). Narrower student embeddings (``embedding_dim``) start
    from the teacher's factorised by a truncated SVD.
    """

    def __init__(
        self,
        src_vocab_size: int = 8000,
        tgt_vocab_size: int = 8000,
        preset: str = "tiny",
        d_model: Optional[int] = None,
        ffn_dim: Optional[int] = None,
        heads: Optional[int] = None,
        encoder_layers: Optional[int] = None,
        decoder_layers: Optional[int] = None,
        dropout: Optional[float] = None,
        bottleneck_dim: Optional[int] = None,
        stacked_ffn: Optional[int] = None,
        embedding_dim: Optional[int] = None,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        pre_norm: bool = False,
        share_embeddings: str = "all",
        max_positions: int = 1024,
        label_smoothing: float = 0.1,
        lr: float = 7e-4,
        warmup_steps: int = 4000,
        betas: tuple[float, float] = (0.9, 0.98),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        val_bleu: bool = True,
        val_bleu_sentences: Optional[int] = None,
        beam_size: int = 4,
        length_penalty: float = 1.0,
        max_len_a: float = 1.2,
        max_len_b: int = 10,
        test_output: Optional[str] = None,
        init_from: Optional[str] = None,
        init_layers: Optional[Union[str, dict[str, list[int]]]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if lr <= 0 or warmup_steps < 0:
            raise ValueError(f"lr must be > 0 and warmup_steps >= 0, got lr={lr}, warmup_steps={warmup_steps}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        # From the arguments, not self.hparams: while LightningCLI instantiates a module, every module
        # saving hyper-parameters gets the CLI's (Lightning's _given_hyperparameters context), so a
        # teacher built for init_from inside this __init__ would get this student's architecture.
        self.model = Transformer(config_from_hyperparameters(dict(
            src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, preset=preset, d_model=d_model,
            ffn_dim=ffn_dim, heads=heads, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
            dropout=dropout, bottleneck_dim=bottleneck_dim, stacked_ffn=stacked_ffn, embedding_dim=embedding_dim,
            attention_dropout=attention_dropout, activation_dropout=activation_dropout, pre_norm=pre_norm,
            share_embeddings=share_embeddings, max_positions=max_positions), pad_id=PAD_ID))
        self.loss_terms: dict[str, _RegisteredTerm] = {}
        self.loss_weights: dict[str, float] = {CROSS_ENTROPY: 1.0}
        # Token normalisation across ranks and accumulated batches (see on_before_optimizer_step).
        self._update_tokens: Optional[torch.Tensor] = None  # target tokens of this update so far, this rank
        self._normaliser: Optional[torch.Tensor] = None  # C: the constant this update's sums are divided by
        self.tokenization: Optional[Tokenization] = None  # set from the data module or the checkpoint
        self._references: dict[str, list[str]] = {}
        self._test_hypotheses: list[tuple[int, str]] = []
        self.val_loss_sum, self.val_tokens = SumMetric(), SumMetric()
        self.val_bleu_metric = SacreBLEUScore(tokenize="13a")
        self.val_chrf_metric = CHRFScore(n_word_order=0)  # chrF2, as sacrebleu's default
        if init_layers is not None and init_from is None:
            raise ValueError("init_layers chooses layers of the init_from checkpoint; give init_from too")
        if init_from is not None:
            self._load_initial_weights(Path(init_from), init_layers)

    @classmethod
    def from_hyperparameters(cls, hyper_parameters: dict) -> "TranslationModule":
        """Rebuild from saved hyper-parameters (LightningCLI adds private keys such as _instantiator)."""
        # init_from is not followed: the weights come from the checkpoint being loaded.
        options = {k: v for k, v in dict(hyper_parameters).items() if not k.startswith("_")}
        return cls(**{**options, "init_from": None, "init_layers": None})

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "TranslationModule":
        """The model of a checkpoint as dense fp32 nn.Modules (eval mode), e.g. as a teacher:
        compression steps that only round (int8) are left out, the others (masks, codebooks) applied."""
        checkpoint = read_checkpoint(path)
        if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
            raise ModelFileError(f"{path}: not a Lightning checkpoint of a translation model")
        module = cls.from_hyperparameters(checkpoint["hyper_parameters"])
        encoded = encode_module_checkpoint(checkpoint, module.model, str(path), quantize="fp32", prefix="model.")
        fill_module(module.model, encoded.tensors, encoded.entries, runtime_layers=False)
        if "nmt_lightning_tokenization" in checkpoint:
            module.tokenization = Tokenization.from_state_dict(checkpoint["nmt_lightning_tokenization"])
        return module.eval().to(map_location)

    def _load_initial_weights(self, path: Path, layers: Optional[Union[str, dict]] = None) -> None:
        """Copy the Transformer weights of the checkpoint ``path`` (trainable tensors only: what
        compression callbacks added, such as ranges or masks, is left to this run's callbacks);
        with ``layers``, the chosen layers of a deeper model (``initialize_from_teacher``)."""
        if not path.is_file():
            raise FileNotFoundError(f"init_from: {path}: no such checkpoint")
        try:
            checkpoint = read_checkpoint(path)
        except ValueError as error:
            raise ValueError(f"init_from: {error}") from None
        if "state_dict" not in checkpoint:
            raise ValueError(f"init_from: {path}: not a Lightning checkpoint")
        if layers is None:
            for stack in ("encoder", "decoder"):
                theirs = 1 + max((int(key.split(".")[2]) for key in checkpoint["state_dict"]
                                  if key.startswith(f"model.{stack}_layers.")), default=-1)
                mine = getattr(self.model.config, f"{stack}_layers")
                if theirs != mine:
                    raise ValueError(f"init_from: {path}: weights do not fit this model (its {stack} has {theirs} "
                                     f"layers, this model's {mine}); a deeper teacher's layers are chosen with "
                                     f"init_layers, e.g. 'every_other'")
            try:
                self.model.load_state_dict(model_weights(checkpoint["state_dict"], self.model))
            except RuntimeError as error:
                first = str(error).strip().splitlines()[1:2] or [""]
                raise ValueError(f"init_from: {path}: weights do not fit this model ({first[0].strip()}); a deeper "
                                 f"teacher's layers are chosen with init_layers, e.g. 'every_other'") from None
        else:
            if "hyper_parameters" not in checkpoint:
                raise ValueError(f"init_from: {path}: no hyper-parameters inside, so its architecture is unknown")
            teacher = TranslationModule.from_hyperparameters(checkpoint["hyper_parameters"]).model
            teacher.load_state_dict(model_weights(checkpoint["state_dict"], teacher))
            try:
                initialize_from_teacher(self.model, teacher, layers)
            except ValueError as error:
                raise ValueError(f"init_from: {path}: {error}") from None
        if "nmt_lightning_tokenization" in checkpoint:
            self.tokenization = Tokenization.from_state_dict(checkpoint["nmt_lightning_tokenization"])

    @property
    def hidden_size(self) -> int:
        """The width of the hidden states (d_model): what a distillation callback projects between."""
        return self.model.config.d_model

    # ------------------------------------------------------------------ extension point
    def register_loss_term(self, name: str, fn: LossTerm, weight: float = 1.0, features: Iterable[str] = ()) -> None:
        """Add ``weight * fn(context)`` to the training loss; re-registering a name replaces it.

        ``fn`` returns the term summed over the batch's target tokens. ``features``: what the
        forward pass must record for it, a subset of ``("hidden_states", "attention")``.
        """
        if name == CROSS_ENTROPY:
            raise ValueError(f"'{CROSS_ENTROPY}' is the module's own term: use set_loss_weight to scale it")
        unknown = set(features) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"register_loss_term('{name}'): unknown features {sorted(unknown)}; choose from {list(FEATURE_NAMES)}")
        self.loss_terms[name] = _RegisteredTerm(fn, float(weight), frozenset(features))

    def remove_loss_term(self, name: str) -> None:
        self.loss_terms.pop(name, None)

    def loss_weight(self, name: str) -> float:
        """The weight of the term ``name`` (``"cross_entropy"`` or a registered one)."""
        if name == CROSS_ENTROPY:
            return self.loss_weights[CROSS_ENTROPY]
        if name in self.loss_terms:
            return self.loss_terms[name].weight
        raise ValueError(f"loss_weight: no loss term '{name}' (registered: {[CROSS_ENTROPY, *self.loss_terms]})")

    def set_loss_weight(self, name: str, weight: float) -> None:
        """Scale the term ``name`` (``"cross_entropy"`` or a registered one) by ``weight`` >= 0."""
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"set_loss_weight('{name}'): the weight must be a finite number >= 0, got {weight}")
        if name == CROSS_ENTROPY:
            self.loss_weights[CROSS_ENTROPY] = float(weight)
        elif name in self.loss_terms:
            self.loss_terms[name].weight = float(weight)
        else:
            raise ValueError(f"set_loss_weight: no loss term '{name}' (registered: {[CROSS_ENTROPY, *self.loss_terms]})")

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "tokenizer"):
            data_tokenization = Tokenization.from_datamodule(datamodule)
            initial = self.tokenization if self.hparams.get("init_from") else None
            if initial is not None and (initial.src_model, initial.tgt_model) != (
                    data_tokenization.src_model, data_tokenization.tgt_model):
                raise ValueError(f"init_from: {self.hparams.init_from} was trained with other sentencepiece models "
                                 f"than the data in {datamodule.data_dir}: its token ids would mean other words")
            self.tokenization = data_tokenization

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The sentencepiece models travel in the checkpoint: it translates on its own.
        if self.tokenization is not None:
            checkpoint["nmt_lightning_tokenization"] = self.tokenization.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "nmt_lightning_tokenization" in checkpoint:
            self.tokenization = Tokenization.from_state_dict(checkpoint["nmt_lightning_tokenization"])
        saved = [key for key in checkpoint.get("state_dict", {}) if PARAMETRIZED in key]
        if saved and not any(PARAMETRIZED in key for key in self.state_dict()):
            raise ValueError(
                f"this checkpoint was trained with compression callbacks (weight transforms such as "
                f"{saved[0]}); run with the same callbacks (e.g. --config recipes/compress/qat.yaml), or "
                f"deploy it with 'nmt-lightning export' / 'nmt-lightning translate --checkpoint'")

    # ------------------------------------------------------------------ training
    def forward(self, source: torch.Tensor, decoder_input: torch.Tensor,
                features: Optional[TransformerFeatures] = None) -> torch.Tensor:
        return self.model(source, decoder_input, features)

    def token_losses(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(label-smoothed loss sum, nll sum, number of target tokens) over non-pad positions."""
        flat_logits, flat_target = logits.flatten(0, 1).float(), target.flatten()
        smoothed = F.cross_entropy(flat_logits, flat_target, ignore_index=PAD_ID,
                                   label_smoothing=self.hparams.label_smoothing, reduction="sum")
        nll = F.cross_entropy(flat_logits, flat_target, ignore_index=PAD_ID, reduction="sum")
        return smoothed, nll, (flat_target != PAD_ID).sum()

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        requested = set().union(*(term.features for term in self.loss_terms.values()))
        features = TransformerFeatures.requesting(requested) if requested else None
        logits = self(batch["source"], batch["decoder_input"], features)
        smoothed, nll, tokens = self.token_losses(logits, batch["target"])
        total = self.loss_weights[CROSS_ENTROPY] * smoothed
        batch_size = batch["source"].shape[0]
        per_token = tokens.clamp(min=1).float()
        if self.loss_terms:
            context = LossContext(self, batch, logits, batch["target"], batch["target"] != PAD_ID, tokens, features,
                                  source_mask=batch["source"] != PAD_ID)
            for name, term in self.loss_terms.items():
                value = term.fn(context)
                self.log(f"train/{name}", value.detach() / per_token, batch_size=batch_size)
                total = total + term.weight * value
        self.log("train/loss", total.detach() / per_token, prog_bar=True, batch_size=batch_size)
        self.log("train/nll", nll / per_token, batch_size=batch_size)
        self.log("train/target_tokens", tokens.float(), reduce_fx="sum", batch_size=batch_size)
        return total * self._sum_to_loss(tokens)

    # ------------------------------------------------------------------ token normalisation
    # Every update divides the sum of its token losses by N, the target tokens of all ranks and
    # all accumulated batches. N is known only after the update's last batch, so each batch
    # returns sum * R * k / C for a constant C of the update (R ranks, k accumulated batches:
    # DDP averages over ranks and Lightning divides by k, so the gradient becomes sum / C),
    # and on_before_optimizer_step multiplies the gradients by C / N. C is k times the tokens of
    # the update's first batches over all ranks (one small reduction, no host sync): the same
    # on every rank, so the returned loss stays about a per-token mean (fp16 loss scaling
    # behaves as usual), and without accumulation C = N, the factor is exactly 1 and nothing
    # depends on earlier updates (a resumed run computes what an uninterrupted one does).
    def _sum_to_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        if self._update_tokens is None:  # the first batch of an update
            first = trainer.strategy.reduce(tokens.detach().float().clone(), reduce_op="sum")
            self._normaliser = (first * accumulate).clamp(min=1)
            self._update_tokens = tokens.detach().float()
        else:
            self._update_tokens = self._update_tokens + tokens
        return trainer.world_size * accumulate / self._normaliser

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._update_tokens is None:
            return
        if self.trainer.world_size * self.trainer.accumulate_grad_batches == 1:
            self._update_tokens = None  # C is this batch's own token count: the factor is exactly 1
            return
        total = self.trainer.strategy.reduce(self._update_tokens.clone(), reduce_op="sum").clamp(min=1)
        factor = self._normaliser / total
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.mul_(factor.to(parameter.grad.dtype))
        self._update_tokens = None

    def on_train_start(self) -> None:
        self._normaliser, self._update_tokens = None, None

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.adam_eps,
                                     weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt_schedule(hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def references(self, split: str) -> list[str]:
        if split not in self._references:
            self._references[split] = self.trainer.datamodule.text_path(split, self.tokenization.tgt_lang).read_text(
                encoding="utf-8").splitlines()
        return self._references[split]

    def translate_batch(self, source: torch.Tensor, beam: Optional[int] = None) -> list[str]:
        """Detokenized translations of a padded source batch (greedy when beam == 1)."""
        hp = self.hparams
        beam = hp.beam_size if beam is None else beam
        search = (greedy_search(self.model, source, hp.max_len_a, hp.max_len_b) if beam == 1 else
                  beam_search(self.model, source, beam, hp.length_penalty, hp.max_len_a, hp.max_len_b))
        return self.tokenization.decode(search.tokens)

    def validation_step(self, batch: dict, batch_index: int) -> None:
        logits = self(batch["source"], batch["decoder_input"])
        smoothed, nll, tokens = self.token_losses(logits, batch["target"])
        self.val_loss_sum.update(nll)
        self.val_tokens.update(tokens)
        if not self.hparams.val_bleu or self.tokenization is None:
            return
        limit = self.hparams.val_bleu_sentences
        rows = torch.arange(len(batch["indices"])) if limit is None else torch.nonzero(batch["indices"] < limit).flatten()
        if len(rows) == 0:
            return
        source = batch["source"][rows]
        hypotheses = self.translate_batch(source[:, : int((source != PAD_ID).sum(1).max())], beam=1)
        references = self.references("valid")
        targets = [[references[int(i)]] for i in batch["indices"][rows]]
        self.val_bleu_metric.update(hypotheses, targets)
        self.val_chrf_metric.update(hypotheses, targets)

    def on_validation_epoch_end(self) -> None:
        nll = self.val_loss_sum.compute() / self.val_tokens.compute().clamp(min=1)
        self.log("val/nll", nll, sync_dist=False)
        self.log("val/ppl", torch.exp(nll.clamp(max=50)), sync_dist=False)
        self.val_loss_sum.reset()
        self.val_tokens.reset()
        if self.hparams.val_bleu and self.tokenization is not None:
            self.log("val/bleu", self.val_bleu_metric.compute() * 100, prog_bar=True)
            self.log("val/chrf", self.val_chrf_metric.compute() * 100)
            self.val_bleu_metric.reset()
            self.val_chrf_metric.reset()

    def test_step(self, batch: dict, batch_index: int) -> None:
        self._require_tokenization()
        hypotheses = self.translate_batch(batch["source"])
        self._test_hypotheses.extend(zip(batch["indices"].tolist(), hypotheses))

    def on_test_epoch_end(self) -> None:
        gathered = [self._test_hypotheses]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self._test_hypotheses)
        self._test_hypotheses = []
        hypotheses = [text for _, text in sorted(pair for part in gathered for pair in part)]
        references = self.references("test")
        output = Path(self.hparams.test_output or Path(self.trainer.log_dir or ".") / f"test.hyp.{self.tokenization.tgt_lang}")
        if self.trainer.is_global_zero:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        scores = score(hypotheses, references)
        if self.trainer.is_global_zero:
            print(f"test hypotheses: {output}\n{scores.report()}", flush=True)
        for name, value in scores.as_dict().items():
            self.log(f"test/{name}", value, sync_dist=False)

    def predict_step(self, batch: dict, batch_index: int) -> list[tuple[int, str]]:
        self._require_tokenization()
        return list(zip(batch["indices"].tolist(), self.translate_batch(batch["source"])))

    def _require_tokenization(self) -> None:
        if self.tokenization is None:
            raise RuntimeError("no sentencepiece models: use a TranslationDataModule or a checkpoint saved by one")


def inverse_sqrt_schedule(warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr: linear warm-up, then decay with 1/sqrt(step) (Vaswani et al.)."""
    def multiplier(step: int) -> float:
        step = step + 1
        if warmup_steps == 0:
            return 1.0 / math.sqrt(step)
        return min(step / warmup_steps, math.sqrt(warmup_steps / step))
    return multiplier

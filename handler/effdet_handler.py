"""TorchServe entry point: a thin ``BaseHandler`` shell over ``handler.detector.Detector``.

TorchServe requires exactly one class defined in this module. Everything it does per request
(decode, geometry, forward, post-processing) lives in the ``handler`` package next to it in the
.mar; this file only maps TorchServe's batch and context onto it and turns each bad request into
its own 4xx JSON answer so that batch-mates are served and the worker lives on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from http import HTTPStatus

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.answer import ModelInfo, RequestError
from handler.card import ModelCard
from handler.config import BatchSizeRefused, HandlerConfig, check_batch_size
from handler.deadline import DEADLINE_HEADER, BatchCost, can_finish, expired, parse_deadline, too_late
from handler.decode import IMAGE_FORMATS
from handler.detector import Detector, bucket_sizes
from handler.request import REQUEST_ID_ECHO_HEADER, Params, header, parse_params, request_id, split_request

logger = logging.getLogger(__name__)


class EffDetHandler(BaseHandler):
    """initialize / preprocess / inference / postprocess around the shared Detector core."""

    def __init__(self):
        super().__init__()
        self.batch_cost = BatchCost()  # what a batch of each bucket size costs here (deadlines)
        self.dropped = {"expired": 0, "late": 0}  # rows answered 504 in the current batch

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = props.get("model_dir")
        # Before anything is loaded: TorchServe takes any batch_size at registration.
        batch_size = check_batch_size(int(props.get("batch_size") or 1))
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        cfg = HandlerConfig.from_yaml(yaml_config.get("handler"))
        self.deadline_margin_ms = cfg.deadline_margin_ms  # kept for an answer's way back to its caller
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        serialized = context.manifest["model"].get("serializedFile", "model.pt")
        card = ModelCard.load(model_dir)
        precision = cfg.precision if self.device.type == "cuda" else "fp32"
        # Every batch runs padded up to one of a few sizes, each warmed below: no batch size that
        # TorchServe forms makes TorchScript profile and fuse again while requests wait.
        buckets = cfg.batch_buckets or bucket_sizes(batch_size)
        self.detector = Detector(
            os.path.join(model_dir, serialized),
            device=self.device,
            precision=precision,
            score_threshold=cfg.score_threshold,
            iou_threshold=cfg.iou_threshold,
            max_pixels=cfg.max_pixels,
            card=card,
            channels_last=cfg.channels_last,
            buckets=[b for b in buckets if b <= batch_size] + [batch_size],
        )
        compiled = getattr(self.detector.model, "max_batch", 0)  # an AOTInductor package's limit
        if compiled and batch_size > compiled:
            raise BatchSizeRefused(
                f"batchSize {batch_size} refused: {serialized} was compiled for batches of 1..{compiled}; "
                f"register the model with batch_size <= {compiled}"
            )
        self.model_info = ModelInfo(
            context.manifest["model"].get("modelName", card.name),
            context.manifest["model"].get("modelVersion", "1.0"),
        )
        self._warm_up(cfg, yaml_config)
        self.context = context
        self.initialized = True
        logger.info("effdet handler ready on %s (%s), classes=%s", self.device, precision, list(card.classes))

    def _warm_up(self, cfg: HandlerConfig, yaml_config: dict) -> None:
        """Warm the buckets within half the model's startupTimeout (TorchServe restarts a worker that
        is not READY by then) or ``warmup_seconds``; say in the model log what was left out."""
        result = self.detector.warm_up(budget_s=cfg.warmup_budget(yaml_config.get("startupTimeout")))
        (logger.warning if result.skipped else logger.info)("%s", result)

    def preprocess(self, data: list[dict]) -> list:
        """Each row -> (Decoded image, Params), the public card for a describe row, or the
        RequestError that row earned.

        Deadlines first (``handler.deadline``): a row whose ``X-Request-Deadline`` has passed is
        answered 504 before its body is looked at, one this batch could not finish in time before
        its image is decoded. The images of the rest are decoded together (on CUDA, nvjpeg takes
        the JPEGs in one call)."""
        now_ms = time.time() * 1000
        items, raws, deadlines = [], [], []
        self.dropped = {"expired": 0, "late": 0}
        for idx, row in enumerate(data):
            if self._header_is_true(idx, "describe"):
                items.append(self.describe_card())
                continue
            try:
                deadline = parse_deadline(self._header(idx, DEADLINE_HEADER), now_ms)
                if deadline is not None and deadline <= now_ms:
                    self.dropped["expired"] += 1
                    raise expired(deadline, now_ms)
                raw, params = split_request(row, self._header(idx, "content-type"))
                params = parse_params(params, self.detector.defaults, self.detector.max_det_per_image)
                items.append(params)
                raws.append(raw)
                deadlines.append(deadline)
            except RequestError as e:
                items.append(e)
        raws = self._in_time(items, raws, deadlines, now_ms)
        decoded = iter(self.detector.decode_batch(raws))
        return [self._paired(next(decoded), it) if isinstance(it, Params) else it for it in items]

    def _in_time(self, items: list, raws: list[bytes], deadlines: list, now_ms: float) -> list[bytes]:
        """Answer 504 (in ``items``) the rows that cannot finish before their deadlines if this
        batch runs now; the bytes of the rows that run."""

        def cost(k: int) -> float | None:
            return self.batch_cost.estimate(self.detector.bucket(k), now_ms)

        margin = self.deadline_margin_ms
        keep = can_finish(deadlines, now_ms, cost, margin)
        if all(keep):
            return raws
        slots = [i for i, it in enumerate(items) if isinstance(it, Params)]
        late = too_late(cost(len(raws)), margin)
        for slot, ok in zip(slots, keep, strict=True):
            if not ok:
                items[slot] = late
        self.dropped["late"] += keep.count(False)
        return [raw for raw, ok in zip(raws, keep, strict=True) if ok]

    @staticmethod
    def _paired(image, params):
        """(decoded image, Params) for a good row; the decode error instead when decoding failed."""
        return image if isinstance(image, RequestError) else (image, params)

    def inference(self, items: list, *args, **kwargs) -> torch.Tensor | None:
        """One forward for the good rows; the results come to the host in one copy at the end."""
        good = [it for it in items if isinstance(it, tuple)]
        if not good:
            return None
        return self.detector.detect_tensors(
            [img for img, _ in good], [p.iou_threshold for _, p in good], [p.score_threshold for _, p in good]
        ).cpu()

    def postprocess(self, detections: torch.Tensor | None, items: list) -> list[dict]:
        good = [it for it in items if isinstance(it, tuple)]
        responses = (
            self.detector.answers(detections, [img.size for img, _ in good], [p for _, p in good])
            if good
            else []
        )
        answers, k = [], 0
        # Under TorchServe's kserve envelope the rows are the instances of one request: then an
        # error stays in its own answer and the request's status is left alone.
        row_per_request = len(items) == len(self.context.request_processor or ())
        for idx, item in enumerate(items):
            rid = None
            if row_per_request:
                # without it TorchServe sends answers and errors with no Content-Type at all
                self.context.set_response_content_type(idx, "application/json")
                # Every answer names its request (header always, JSON of a 200 too): a caller can
                # tell a stale or misrouted answer on a keep-alive connection from its own.
                processor = self.context.request_processor[idx]
                rid = request_id(processor.get_request_properties(), self.context.get_request_id(idx))
                self.context.set_response_header(idx, REQUEST_ID_ECHO_HEADER, rid)
            if isinstance(item, RequestError):
                if row_per_request:
                    # The reason phrase is fixed ASCII text: TorchServe's worker protocol sends its
                    # length in characters but its bytes in UTF-8, so one non-ASCII byte of request
                    # data there desynchronises the stream and kills the worker. Details go in the
                    # JSON body, which TorchServe serialises with ensure_ascii.
                    self.context.set_response_status(item.status, HTTPStatus(item.status).phrase, idx)
                answers.append(item.to_json())
                continue
            if isinstance(item, dict):  # a describe row's card
                answers.append(item)
                continue
            answers.append(responses[k].served(self.model_info, rid).to_json())
            k += 1
        return answers

    def handle(self, data: list[dict], context) -> list[dict]:
        """One answer per row, describe rows included.

        ``GET /models/{name}?customized=true`` reaches the worker as a batch of one row with the
        header ``describe: True`` (TorchServe's frontend never batches it with predictions), and
        TorchServe puts the answer under ``customizedMetadata``. The same header on
        ``/predictions`` looks alike to a worker and may share a batch with predictions, so it is
        answered per row, with the same public card, and its batch-mates are served as usual.
        ``BaseHandler.handle`` instead answers the whole batch with one card when its first row
        has the header: TorchServe then fails every request of that batch.
        """
        self.context = context
        t0 = time.perf_counter()
        items = self.preprocess(data)
        t1 = time.perf_counter()
        detections = self.inference(items)
        t2 = time.perf_counter()
        answers = self.postprocess(detections, items)
        t3 = time.perf_counter()
        ran = sum(isinstance(it, tuple) for it in items)
        if ran:  # what this batch cost, decode to JSON: the deadline check of the next ones
            self.batch_cost.update(self.detector.bucket(ran), (t3 - t0) * 1000, time.time() * 1000)
        self._metrics(context, t1 - t0, t2 - t1, t3 - t2, answers, self.dropped)
        return answers

    def describe_card(self) -> dict:
        """What an inference client needs to call the model well, and nothing about where or how
        it was trained: name, version, class names, network input size, the parameters'
        defaults and limits, accepted formats and the device type (cpu or cuda, to set client
        timeouts). Provenance and metrics (dataset path on the training machine, library versions,
        val mAP) stay in model.json inside the archive, for operators."""
        defaults = self.detector.defaults
        return {
            "model": self.model_info.to_json(),
            "classes": list(self.detector.card.classes),
            "image_size": list(self.detector.geometry.size),
            "defaults": {
                "score_threshold": defaults.score_threshold,
                "iou_threshold": defaults.iou_threshold,
                "max_detections": defaults.max_detections,
            },
            "limits": {
                "max_detections": self.detector.max_det_per_image,
                "max_pixels": self.detector.max_pixels,
                "formats": list(IMAGE_FORMATS),
            },
            "device": self.device.type,
        }

    def describe_handle(self) -> str:
        """BaseHandler's describe hook: the public card as JSON text."""
        return json.dumps(self.describe_card())

    def _header(self, idx: int, name: str) -> str | None:
        """Request header ``name`` of row ``idx`` (any case)."""
        try:
            headers = self.context.get_all_request_header(idx) or {}
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
        return header(headers, name)

    def _header_is_true(self, idx: int, name: str) -> bool:
        value = self._header(idx, name)
        return value is not None and value.strip().lower() == "true"

    @staticmethod
    def _metrics(
        context, pre: float, inf: float, post: float, answers: list[dict], dropped: dict | None = None
    ) -> None:
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        try:
            metrics.add_time("EffDetPreprocessTime", pre * 1000, None, "ms")
            metrics.add_time("EffDetInferenceTime", inf * 1000, None, "ms")
            metrics.add_time("EffDetPostprocessTime", post * 1000, None, "ms")
            for a in answers:
                if isinstance(a, dict) and "detections" in a:
                    metrics.add_counter("EffDetDetections", len(a["detections"]), None)
            for why, count in (dropped or {}).items():  # rows answered 504 deadline_exceeded
                if count:
                    metrics.add_counter(f"EffDetDeadline{why.capitalize()}", count, None)
        except Exception:  # metrics must never fail a request
            logger.debug("metric emission failed", exc_info=True)

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

from handler.decode import RequestError
from handler.detector import Detector, load_card
from handler.request import REQUEST_ID_ECHO_HEADER, parse_params, request_id, split_request

logger = logging.getLogger(__name__)


class EffDetHandler(BaseHandler):
    """initialize / preprocess / inference / postprocess around the shared Detector core."""

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = props.get("model_dir")
        yaml_cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        threads = yaml_cfg.get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        serialized = context.manifest["model"].get("serializedFile", "model.pt")
        card = load_card(model_dir)
        precision = yaml_cfg.get("precision", "fp32") if self.device.type == "cuda" else "fp32"
        self.detector = Detector(
            os.path.join(model_dir, serialized),
            device=self.device,
            precision=precision,
            score_threshold=yaml_cfg.get("score_threshold"),
            iou_threshold=yaml_cfg.get("iou_threshold"),
            max_pixels=int(yaml_cfg.get("max_pixels", 40_000_000)),
            card=card,
        )
        self.model_info = {
            "name": context.manifest["model"].get("modelName", card.get("name")),
            "version": context.manifest["model"].get("modelVersion", "1.0"),
        }
        self.detector.warm_up(sorted({1, int(props.get("batch_size") or 1)}))
        self.context = context
        self.initialized = True
        logger.info("effdet handler ready on %s (%s), classes=%s", self.device, precision, card["classes"])

    def preprocess(self, data: list[dict]) -> list:
        """Each row -> (uint8 image, Params) or the RequestError that row earned."""
        items = []
        for row in data:
            try:
                raw, params = split_request(row)
                params = parse_params(params, self.detector.defaults, self.detector.max_det_per_image)
                items.append((self.detector.decode(raw), params))
            except RequestError as e:
                items.append(e)
        return items

    def inference(self, items: list, *args, **kwargs) -> torch.Tensor | None:
        good = [it for it in items if not isinstance(it, RequestError)]
        if not good:
            return None
        return self.detector.detect_tensors(
            [img for img, _ in good], [p.iou_threshold for _, p in good], [p.score_threshold for _, p in good]
        ).cpu()

    def postprocess(self, detections: torch.Tensor | None, items: list | None = None) -> list[dict]:
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
            img, params = item
            response = self.detector.to_response(detections[k], img.shape[-1], img.shape[-2], params)
            answers.append({"model": self.model_info, **response} | ({"request_id": rid} if rid else {}))
            k += 1
        return answers

    def handle(self, data: list[dict], context) -> list[dict]:
        self.context = context
        # GET /models/{name}?customized=true arrives here as a request with header describe=True;
        # BaseHandler.handle routes it to describe_handle, and so must this override.
        if context.request_processor and self._is_describe():
            return [self.describe_handle()]
        t0 = time.perf_counter()
        items = self.preprocess(data)
        t1 = time.perf_counter()
        detections = self.inference(items)
        t2 = time.perf_counter()
        answers = self.postprocess(detections, items)
        t3 = time.perf_counter()
        self._metrics(context, t1 - t0, t2 - t1, t3 - t2, answers)
        return answers

    def describe_handle(self) -> str:
        card = self.detector.card
        return json.dumps(
            {
                "model": self.model_info,
                "classes": card["classes"],
                "image_size": card["preprocessing"]["size"],
                "defaults": self.detector.defaults.__dict__,
                "device": str(self.device),
                "provenance": card.get("provenance", {}),
                "metrics": card.get("metrics", {}),
            }
        )

    @staticmethod
    def _metrics(context, pre: float, inf: float, post: float, answers: list[dict]) -> None:
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        try:
            metrics.add_time("EffDetPreprocessTime", pre * 1000, None, "ms")
            metrics.add_time("EffDetInferenceTime", inf * 1000, None, "ms")
            metrics.add_time("EffDetPostprocessTime", post * 1000, None, "ms")
            for a in answers:
                if "detections" in a:
                    metrics.add_counter("EffDetDetections", len(a["detections"]), None)
        except Exception:  # metrics must never fail a request
            logger.debug("metric emission failed", exc_info=True)

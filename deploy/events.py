"""TensorBoard summaries from the `tensorboard` package's protobufs and its plugins' metadata,
with NumPy for the histograms, and `EventWriter`, which writes them (`deploy.eventfile`).

The driver writes a run's points with these (`deploy.metrics.MetricsWriter`), so it never
loads torch. The events are those TensorBoard's readers expect, the ones torch's
`SummaryWriter` writes: a text summary is a string tensor tagged `<tag>/text_summary`, a
histogram has TensorFlow's default buckets (edges at ±1e-12 x 1.1^k, and 0) cut to the range
that holds values, and a resumed run marks the step it goes on from with a `SessionLog.START`
event, at which TensorBoard drops what an earlier writer logged at or after that step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.text import metadata as text_metadata

from deploy.eventfile import FILE_VERSION, EventFile

Summary = summary_pb2.Summary

# The hparams plugin's names (`tensorboard.plugins.hparams.metadata`, which would import
# TensorBoard's TensorFlow stub and with it fsspec and boto3; tests/test_tensorboard.py checks
# that they are the same).
HPARAMS_PLUGIN = "hparams"
HPARAMS_VERSION = 0
EXPERIMENT_TAG = "_hparams_/experiment"
SESSION_START_INFO_TAG = "_hparams_/session_start_info"
SESSION_END_INFO_TAG = "_hparams_/session_end_info"


def _default_edges() -> np.ndarray:
    """TensorFlow's default histogram bucket edges: 0, and ±1e-12 x 1.1^k below 1e20 (1,549
    edges), so a value's bucket is ~10% wide whatever its scale."""
    # Repeated products, not powers: the edges TensorFlow's and torch's writers use, bit for bit.
    positive = [1e-12]
    while positive[-1] * 1.1 < 1e20:
        positive.append(positive[-1] * 1.1)
    return np.array([-v for v in reversed(positive)] + [0.0] + positive)


HISTOGRAM_EDGES = _default_edges()


class EventWriter:
    """One new event file in `logdir`; `write` adds a summary, written and flushed at once.

    `purge_step`: the step a resumed run goes on from; what an earlier writer of this directory
    logged at or after it is hidden by TensorBoard (and by `EventAccumulator`), so no step is
    shown twice.
    """

    def __init__(self, logdir: str, purge_step: int | None = None):
        self._file = EventFile(logdir)
        if purge_step is not None:  # the events TensorFlow's own writers mark a restart with
            self._file.add(event_pb2.Event(file_version=FILE_VERSION), purge_step)
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._file.add(event_pb2.Event(session_log=start), purge_step)

    def write(self, summary: summary_pb2.Summary, step: int | None = None) -> None:
        self._file.add(event_pb2.Event(summary=summary), step)

    def close(self) -> None:
        self._file.close()


def scalars(values: Mapping[str, float | None]) -> summary_pb2.Summary | None:
    """One summary of many scalars (None and non-finite values left out); None if none is left.
    One event per point, not one per tag: a point of ~60 tags costs ~20x less driver time."""
    kept = [
        Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in values.items()
        if value is not None and math.isfinite(value)
    ]
    return Summary(value=kept) if kept else None


def _string_tensor(data: bytes, shape: Sequence[int]) -> tensor_pb2.TensorProto:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
    return tensor_pb2.TensorProto(
        dtype="DT_STRING",
        string_val=[data],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
    )


def text(tag: str, markdown: str) -> summary_pb2.Summary:
    """A text summary, tagged `<tag>/text_summary` (TensorBoard's Text tab renders Markdown)."""
    meta = text_metadata.create_summary_metadata(display_name=None, description=None)
    tensor = _string_tensor(markdown.encode("utf-8"), [1])
    return Summary(value=[Summary.Value(tag=f"{tag}/text_summary", metadata=meta, tensor=tensor)])


def histogram(tag: str, values: np.ndarray) -> summary_pb2.Summary | None:
    """The histogram of `values` (any shape; non-finite values left out) in the default buckets,
    from an empty bucket below the lowest value's to the highest value's (a bucket's limit is
    its upper edge, so the empty one gives the left edge); None when no value is finite."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if not flat.size:
        return None
    counts, _ = np.histogram(flat, bins=HISTOGRAM_EDGES)
    # below[i]: the count of the bucket whose upper edge is HISTOGRAM_EDGES[i] (none below 0).
    below = np.concatenate([[0], counts])
    filled = np.flatnonzero(below)
    first, last = filled[0] - 1, filled[-1]  # below[0] is 0: first >= 0
    histo = summary_pb2.HistogramProto(
        min=float(flat.min()),
        max=float(flat.max()),
        num=float(flat.size),
        sum=float(flat.sum()),
        sum_squares=float(flat @ flat),
        bucket_limit=HISTOGRAM_EDGES[first : last + 1].tolist(),
        bucket=below[first : last + 1].astype(np.float64).tolist(),
    )
    return Summary(value=[Summary.Value(tag=tag, histo=histo)])


def custom_scalars(layout: Mapping[str, Mapping[str, Sequence]]) -> summary_pb2.Summary:
    """The custom-scalars dashboard: `{category: {chart title: [kind, series]}}`, a kind
    "Multiline" with a list of tag regexes, or "Margin" with the tags `[value, lower, upper]`."""
    categories = []
    for title, charts in layout.items():
        category = layout_pb2.Category(title=title)
        for name, (kind, series) in charts.items():
            if kind == "Multiline":
                content = layout_pb2.MultilineChartContent(tag=list(series))
                category.chart.add(title=name, multiline=content)
            elif kind == "Margin":
                value, lower, upper = series
                band = layout_pb2.MarginChartContent.Series(value=value, lower=lower, upper=upper)
                category.chart.add(title=name, margin=layout_pb2.MarginChartContent(series=[band]))
            else:
                raise ValueError(f"chart {name!r}: kind {kind!r} is not Multiline or Margin")
        categories.append(category)
    tensor = _string_tensor(layout_pb2.Layout(category=categories).SerializeToString(), [])
    meta = custom_scalar_metadata.create_summary_metadata()
    tag = custom_scalar_metadata.CONFIG_SUMMARY_TAG
    return Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)])


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    data.version = HPARAMS_VERSION
    plugin = summary_pb2.SummaryMetadata.PluginData(
        plugin_name=HPARAMS_PLUGIN, content=data.SerializeToString()
    )
    meta = summary_pb2.SummaryMetadata(plugin_data=plugin)
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def hparams_start(
    values: Mapping[str, bool | float | str], metrics: Mapping[str, str]
) -> list[summary_pb2.Summary]:
    """The hparams plugin's experiment (each key with its type; the metrics, tag -> display
    name, training-set scalars) and the session's start (each key's value)."""
    infos, start = [], plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in values.items():
        if isinstance(value, bool):  # before int: a bool is an int too
            kind, start.hparams[key].bool_value = api_pb2.DATA_TYPE_BOOL, value
        elif isinstance(value, (int, float)):
            kind, start.hparams[key].number_value = api_pb2.DATA_TYPE_FLOAT64, float(value)
        elif isinstance(value, str):
            kind, start.hparams[key].string_value = api_pb2.DATA_TYPE_STRING, value
        else:
            raise TypeError(f"hparam {key}: {type(value).__name__} is not a bool, number or str")
        infos.append(api_pb2.HParamInfo(name=key, type=kind))
    experiment = api_pb2.Experiment(
        hparam_infos=infos,
        metric_infos=[
            api_pb2.MetricInfo(
                name=api_pb2.MetricName(tag=tag),
                display_name=name,
                dataset_type=api_pb2.DATASET_TRAINING,
            )
            for tag, name in metrics.items()
        ],
    )
    return [
        _hparams_summary(
            EXPERIMENT_TAG,
            plugin_data_pb2.HParamsPluginData(experiment=experiment),
        ),
        _hparams_summary(
            SESSION_START_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_start_info=start),
        ),
    ]


def hparams_end(ok: bool) -> summary_pb2.Summary:
    """The session's end: success or failure, and when."""
    status = api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    data = plugin_data_pb2.HParamsPluginData(session_end_info=end)
    return _hparams_summary(SESSION_END_INFO_TAG, data)

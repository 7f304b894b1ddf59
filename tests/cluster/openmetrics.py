"""Parse an OpenMetrics exposition from stdin with the Prometheus project's
own parser (prometheus_client) and print every sample as JSON lines:
{"name": ..., "labels": {...}, "value": ...}. A malformed exposition makes
the parser raise, and this exit non-zero."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

text = sys.stdin.read()
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": sample.name,
                          "labels": sample.labels, "value": sample.value}))

#!/usr/bin/env bash
# `make nightly`: send today's campaign of the job, then read the delivery reports of the
# job's previous campaign (its SMS have had a day to settle). A job without a reporting:
# section only warns; the exit code is the send's.
#   scripts/nightly.sh [JOB.yaml]
set -u
bin=${BIN:-.venv/bin}
job=${1:-jobs/nightly.yaml}

# The charts of a campaign for the mail: runs/<campaign>/report.html, once it is written.
print_report() {
  "$bin/python" - "$job" "${1:-}" <<'PY'
import sys
from pathlib import Path

from campaign.errors import CampaignError
from campaign.job import load_job

try:
    job = load_job(sys.argv[1])
except CampaignError:
    sys.exit(0)
report = Path(job.output_dir) / (sys.argv[2] or job.campaign_id()) / "report.html"
if report.is_file():
    print(f"report: {report}")
PY
}

"$bin/campaign" run "$job"
sent=$?
[ "$sent" -eq 130 ] && exit 130
print_report

previous=$("$bin/python" - "$job" <<'PY'
import sys
from pathlib import Path

from campaign.errors import CampaignError
from campaign.job import load_job
from campaign.store.campaigns import list_campaigns

try:
    job = load_job(sys.argv[1])
except CampaignError as exc:
    sys.exit(f"warning: no delivery reports read: {exc}")
if job.reporting is None:
    sys.exit(f"warning: {job.path} has no reporting: section; delivery reports are not read")
today = job.campaign_id()
earlier = [c.id for c in list_campaigns(Path(job.output_dir)) if c.job == job.name and c.id != today]
if not earlier:
    sys.exit("no earlier campaign of this job: no delivery reports to read yet")
print(earlier[0])
PY
) || exit "$sent"

"$bin/campaign" reconcile "$job" --campaign "$previous" || echo "warning: reconcile of $previous ended with exit $?" >&2
print_report "$previous"
exit "$sent"

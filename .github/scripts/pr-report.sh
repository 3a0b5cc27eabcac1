#!/usr/bin/env bash
# Pipeline workflow, pull requests only: render the comment pr-report.yml posts. Compares this run's
# summary with the `summary` artifact of main's latest successful pipeline run (if there is one).
# Needs GH_TOKEN (actions: read), PR_NUMBER and HEAD_SHA; writes pr-report/report.md + pr-report/pr-number.
set -euo pipefail
out=pr-report
mkdir -p "$out"
baseline=()
main_run=$(gh run list --repo "$GITHUB_REPOSITORY" --workflow pipeline.yml --branch main --event push \
    --status success --limit 1 --json databaseId --jq '.[0].databaseId // empty')
if [ -n "$main_run" ] && gh run download "$main_run" --repo "$GITHUB_REPOSITORY" --name summary --dir "$out/main"; then
    baseline=(--baseline "$out/main/summary.json")
fi
.venv/bin/python .github/scripts/pr_report.py "${CLUSTER_OUTPUT:-runs/cluster}/summary.json" "${baseline[@]}" \
    --run-url "$GITHUB_SERVER_URL/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID" --commit "$HEAD_SHA" \
    > "$out/report.md"
echo "$PR_NUMBER" > "$out/pr-number"

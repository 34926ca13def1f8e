"""Offline batch jobs: `moeflow batch` (OpenAI Batch API JSONL in and out) and the Ray Data callable."""

# The evaluation app owns no tables: runs live in runs.models; scores in runs.models (RunResult, SampleResult).

#!/bin/bash
# Grade a course on N hosts with Slurm: a job array of N shards, then the merge once all of them succeeded.
#
#   autograder/slurm/submit.sh N SUBMITTED GRADED [grade options ...]     (from the kit's root)
#
# Prints the two job ids. The merged course folder is GRADED/course (formgrader, export); the shards stay in
# GRADED/shard-I-of-N (regrade one with `sbatch --array=I autograder/slurm/grade.sbatch N ...`, then merge.sbatch).
set -euo pipefail
usage="usage: submit.sh N SUBMITTED GRADED [grade options]"
count=${1:?$usage}
submitted=${2:?$usage}
graded=${3:?$usage}
shift 3
here=$(dirname "$(realpath "$0")")
grading=$(sbatch --parsable --array="1-$count" "$here/grade.sbatch" "$count" "$submitted" "$graded" "$@")
grading=${grading%%;*}  # --parsable prints "jobid[;cluster]"
merging=$(sbatch --parsable --dependency="afterok:$grading" "$here/merge.sbatch" "$count" "$graded")
echo "grading: job array $grading (shards 1-$count); merge: job ${merging%%;*} (after all shards succeeded)"

"""The comparison's outputs: results.json, the Markdown table and the frontier plot."""

import json
import os
import statistics


def fmt(value, spec='.4f'):
  return 'n/a' if value is None else format(value, spec)


def describe_layers(layers):
  """['window:64', 'window:64', 'dense'] -> 'window:64 x2, dense'; runs in layer order."""
  runs = []
  for spec in layers:
    if runs and runs[-1][0] == spec:
      runs[-1][1] += 1
    else:
      runs.append([spec, 1])
  return ', '.join(spec if count == 1 else f'{spec} x{count}' for spec, count in runs)


def run_task_scores(run):
  """{(task, length): score} of one run's task evaluation (empty without one). The score is
  the fraction of answers exactly right (RULER's string_match_all; for MQAR, Zoology's
  per-query accuracy); for one-answer tasks it is the exact-match accuracy."""
  tasks = (run.get('tasks') or {}).get('tasks', {})
  return {(task, int(length)): per_length['score']
          for task, per_task in tasks.items() for length, per_length in per_task['lengths'].items()}


def seed_task_scores(arm):
  """{(task, length): [score of each seed run that has it]}."""
  scores = {}
  for run in arm.get('seed_runs') or [arm]:
    for key, score in run_task_scores(run).items():
      scores.setdefault(key, []).append(score)
  return scores


def task_accuracies(arm):
  """{(task, length): score}, the mean over the arm's seeds."""
  return {key: statistics.fmean(values) for key, values in seed_task_scores(arm).items()}


def fmt_score(values):
  """'0.427' for one seed, '0.427 ± 0.050' (mean ± sample standard deviation) for several."""
  if not values:
    return 'n/a'
  return fmt(statistics.fmean(values), '.3f') + (f' ± {statistics.stdev(values):.3f}' if len(values) > 1 else '')


def mean_of(values):
  """The mean of the values that are not None; None if there are none."""
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def merged_nll(nlls):
  """The seeds' eval.py results averaged: overall NLL and each position bucket's."""
  nlls = [n for n in nlls if n]
  if not nlls:
    return None
  buckets = [{**bucket, 'nll': mean_of([n['position_buckets'][i]['nll'] for n in nlls])}
             for i, bucket in enumerate(nlls[0]['position_buckets'])]
  return {**nlls[0], 'nll': mean_of([n['nll'] for n in nlls]), 'position_buckets': buckets}


def merge_seed_runs(runs):
  """An arm's fields for the tables from its seed runs ([{'seed', **saved}]): one run's own,
  or the means over several (step times, final loss, NLL); task scores are read from
  the runs themselves (seed_task_scores)."""
  if len(runs) == 1:
    return {key: value for key, value in runs[0].items() if key != 'seed'}
  train = {key: mean_of([run['train'].get(key) for run in runs]) for key in runs[0]['train']}
  return {'step': runs[0]['step'], 'train': train, 'nll': merged_nll([run['nll'] for run in runs]), 'tasks': None}


def mean_task_accuracy(arm):
  return mean_of(list(task_accuracies(arm).values()))


def last_bucket_nll(arm):
  if not arm['nll']:
    return None
  buckets = [b for b in arm['nll']['position_buckets'] if b['nll'] is not None]
  return buckets[-1] if buckets else None


def summary_table(results):
  arms = results['arms']
  task_keys = sorted({key for arm in arms.values() for key in task_accuracies(arm)})
  tasks = sorted({task for task, _ in task_keys})
  header = ['arm', 'layers', 'params (vs first)', 'attention MFLOP/token', 'step ms', 'val NLL',
            'NLL at the last positions'] + [f'{task} score' for task in tasks]
  lines = ['| ' + ' | '.join(header) + ' |', '| --- ' * len(header) + '|']
  for name, arm in arms.items():
    last = last_bucket_nll(arm)
    per_task = []
    runs = arm.get('seed_runs') or [arm]
    for task in tasks:  # per seed the mean over lengths, then mean ± deviation over the seeds
      per_seed = [mean_of([a for (t, _), a in run_task_scores(run).items() if t == task]) for run in runs]
      per_task.append(fmt_score([v for v in per_seed if v is not None]))
    step = arm['train'].get('compute_time_s', arm['train']['step_time_s'])
    cells = [name, describe_layers(arm['layers']),
             f'{arm["params"] / 1e6:.2f}M ({arm["params_vs_first"]:+.1%})',
             fmt(arm['attention_flops_per_token'] / 1e6, '.2f'), fmt(step * 1e3 if step else None, '.1f'),
             fmt(arm['nll']['nll'] if arm['nll'] else None), f'{fmt(last["nll"])} [{last["start"]}, {last["end"]})' if last else 'n/a']
    lines.append('| ' + ' | '.join(cells + per_task) + ' |')
  return '\n'.join(lines)


def task_length_table(results):
  """Accuracy of every arm per (task, length); '' when no arm was scored on tasks."""
  arms = results['arms']
  keys = sorted({key for arm in arms.values() for key in task_accuracies(arm)})
  if not keys:
    return ''
  header = ['arm'] + [f'{task} @ {length}' for task, length in keys]
  lines = ['| ' + ' | '.join(header) + ' |', '| --- ' * len(header) + '|']
  for name, arm in arms.items():
    scores = seed_task_scores(arm)
    lines.append('| ' + ' | '.join([name] + [fmt_score(scores.get(key, [])) for key in keys]) + ' |')
  return '\n'.join(lines)


def run_depth_scores(run):
  """{(task, length): accuracy at each needle depth} of one run's task evaluation, for tasks
  scored at several depths; and {task: the depths}."""
  tasks = (run.get('tasks') or {}).get('tasks', {})
  scores, depths = {}, {}
  for task, per_task in tasks.items():
    if len(per_task.get('depths', [])) < 2:
      continue
    depths[task] = per_task['depths']
    for length, per_length in per_task['lengths'].items():
      scores[(task, int(length))] = per_length['accuracy_by_depth']
  return scores, depths


def depth_table(results):
  """Per task scored at several needle depths, each arm's accuracy at every depth (mean over
  its seeds), one cell per length: where in the context an arm finds the needle, which the
  score by length averages away (a window that answers only the last depth scores 0.20)."""
  rows, depths = [], {}
  for name, arm in results['arms'].items():
    per_seed = [run_depth_scores(run) for run in arm.get('seed_runs') or [arm]]
    for _, seed_depths in per_seed:
      depths.update(seed_depths)
    keys = sorted({key for scores, _ in per_seed for key in scores})
    for key in keys:
      grids = [scores[key] for scores, _ in per_seed if key in scores]
      rows.append((key, name, [statistics.fmean(values) for values in zip(*grids)]))
  if not rows:
    return ''
  lengths = sorted({length for (_, length), _, _ in rows})
  lines = ['| task (depths) | arm | ' + ' | '.join(f'@ {length}' for length in lengths) + ' |',
           '| --- ' * (len(lengths) + 2) + '|']
  for task in sorted(depths):
    cells = {}
    for (row_task, length), name, values in rows:
      if row_task == task:
        cells.setdefault(name, {})[length] = ' '.join(f'{v:.2f}' for v in values)
    label = f'{task} ({", ".join(f"{d:.0%}" for d in depths[task])})'
    for name, by_length in cells.items():
      lines.append(f'| {label} | {name} | ' + ' | '.join(by_length.get(length, '') for length in lengths) + ' |')
  return '\n'.join(lines)


def position_table(results):
  """Validation NLL by position bucket, one column per arm."""
  arms = {name: arm for name, arm in results['arms'].items() if arm['nll']}
  if not arms:
    return ''
  names = list(arms)
  first = arms[names[0]]['nll']['position_buckets']
  lines = ['| positions | ' + ' | '.join(names) + ' |', '| --- ' * (len(names) + 1) + '|']
  for index, bucket in enumerate(first):
    cells = [fmt(arms[n]['nll']['position_buckets'][index]['nll']) for n in names]
    lines.append(f'| [{bucket["start"]}, {bucket["end"]}) | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def task_mix(specs):
  """Training task specs in first-seen order, a repeated one written once with its count
  (`mqar:pairs=32@512 x16`): specs are drawn uniformly, so the count is its weight."""
  counts = {}
  for spec in specs:
    counts[spec] = counts.get(spec, 0) + 1
  return ', '.join(spec if count == 1 else f'{spec} x{count}' for spec, count in counts.items())


def report_markdown(results):
  s = results['settings']
  if not results['arms']:
    return f'Suite `{results["suite"]}`: no arm has results yet.\n'
  seeds = s.get('seeds') or [s['seed']]
  seed_text = (f'seed {seeds[0]}' if len(seeds) == 1 else
               f'seeds {", ".join(map(str, seeds))} (each figure the mean over an arm\'s seeds; ± their standard '
               'deviation; seeds per arm in results.json)')
  parts = [f'Suite `{results["suite"]}` on {results["device"]}: {s["steps"]} steps x {s["global_batch_size"]} x '
           f'{s["seq_len"]} tokens, {seed_text}, data {s["data"]}'
           + (f' with {s["task_fraction"]:.0%} task rows ({task_mix(s["tasks"])})' if s['tasks'] else '')
           + '. Attention FLOPs: nominal forward FLOPs per token of all layers\' attention (scores and values, '
           'projections excluded). Step ms: median measured train step after compilation, less its wait for input data.',
           '', summary_table(results)]
  base = results.get('base_config')
  if base:
    layers = describe_layers(results['arms'].get('base', {}).get('layers', [])) or 'its layers'
    parts += ['', f'Every arm starts from the parameters of the base run (row `base`: {base["train"]["steps"]} '
              f'steps of {layers} at {base["data"]["seq_len"]} tokens); the arms\' steps above come after it.']
  if results.get('from_arms'):
    parts += ['', f'Every arm starts from the parameters of its namesake in `{results["from_arms"]}` '
              '(progressive-length training); the arms\' steps above come after those.']
  for title, table in (('Task score by length (fraction of answers whose greedy decoding is exact)', task_length_table(results)),
                       ('Exact match by needle depth (0% = the start of the context), one cell per length',
                        depth_table(results)),
                       ('Validation NLL by position (nats/token)', position_table(results))):
    if table:
      parts += ['', f'**{title}**', '', table]
  if results['notes']:
    parts += ['', results['notes'].strip()]
  return '\n'.join(parts) + '\n'


def quality(arm):
  """(value, label, higher is better) of the frontier's y axis: mean task accuracy if the
  suite scores tasks, else validation NLL."""
  accuracy = mean_task_accuracy(arm)
  if accuracy is not None:
    return accuracy, 'mean task score', True
  return (arm['nll']['nll'] if arm['nll'] else float('nan')), 'validation NLL (nats/token)', False


def frontier(points, higher_is_better):
  """The points no other point beats on both cost (lower) and quality, sorted by cost."""
  best, kept = None, []
  ordered = sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1]))  # ties: the better first
  for cost, value, name in ordered:
    if best is None or (value > best if higher_is_better else value < best):
      kept.append((cost, value, name))
      best = value
  return kept


def plot_frontier(results, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  arms = results['arms']
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  label, higher = None, True
  for ax, (cost_name, cost_of) in zip(axes, (
      ('attention MFLOP per token (forward, all layers)', lambda a: a['attention_flops_per_token'] / 1e6),
      ('train step time without input waits (ms, median)',
       lambda a: (a['train'].get('compute_time_s') or float('nan')) * 1e3))):
    points = []
    for name, arm in arms.items():
      value, label, higher = quality(arm)
      cost = cost_of(arm)
      if cost > 0:  # not NaN: a run of one step has no step time after the compiling one
        points.append((cost, value, name))
        ax.scatter([cost], [value], s=36)
        ax.annotate(name, (cost, value), textcoords='offset points', xytext=(4, 4), fontsize=8)
    line = frontier(points, higher)
    if len(line) > 1:
      ax.plot([p[0] for p in line], [p[1] for p in line], '--', color='grey', lw=1)
    if points:
      ax.set_xscale('log')
    else:
      ax.text(0.5, 0.5, 'not measured (runs of one step)', transform=ax.transAxes, ha='center')
    ax.set_xlabel(cost_name)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  fig.suptitle(f'{results["suite"]}: quality against cost ({"higher" if higher else "lower"} is better)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(results, workdir):
  """DIR/results.json, results.md and frontier.png; returns their paths."""
  paths = {name: os.path.join(workdir, file) for name, file in (
      ('json', 'results.json'), ('markdown', 'results.md'), ('plot', 'frontier.png'))}
  with open(paths['json'], 'w') as f:
    json.dump(results, f, indent=2)
  with open(paths['markdown'], 'w') as f:
    f.write(report_markdown(results))
  if results['arms']:
    plot_frontier(results, paths['plot'])
  else:
    del paths['plot']
  return paths

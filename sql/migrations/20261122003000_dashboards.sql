-- Views for dashboards (Supabase Studio, Grafana) and the retention of finished jobs.
-- Every view is security_invoker: it shows only what its reader could read from the tables
-- themselves, and none is granted to anon or authenticated. Durations are in seconds.

-- Finished jobs leave the hot table here (prune_jobs); per-user usage keeps counting them.
-- `job` is the whole row as it was, so columns added to jobs later are archived too.
create table public.jobs_archive (
  id uuid primary key,
  user_id uuid references auth.users (id) on delete cascade,
  job_type text not null,
  queue text not null,
  status public.job_status not null,
  created_at timestamptz not null,
  started_at timestamptz,
  finished_at timestamptz not null,
  archived_at timestamptz not null default now(),
  job jsonb not null
);

comment on table public.jobs_archive is 'Terminal jobs moved out of public.jobs by public.prune_jobs().';

create index jobs_archive_finished_idx on public.jobs_archive (finished_at);
create index jobs_archive_user_idx on public.jobs_archive (user_id);

alter table public.jobs_archive enable row level security;
revoke all on table public.jobs_archive from public, anon, authenticated;
grant all on table public.jobs_archive to service_role;

-- Serves retention and the time windows below. Only finished rows enter it.
create index jobs_finished_idx on public.jobs (finished_at) where finished_at is not null;

create view public.job_throughput_hourly with (security_invoker = true) as
select date_trunc('hour', finished_at) as hour,
       job_type,
       count(*) as finished,
       count(*) filter (where status = 'completed') as completed,
       count(*) filter (where status = 'failed') as failed,
       count(*) filter (where status = 'canceled') as canceled
from public.jobs
where finished_at is not null
group by 1, 2;

comment on view public.job_throughput_hourly is
  'Jobs finished per job type per hour (session time zone), by final status.';

-- Wait: created until the start of the attempt that completed (retries included).
-- Run: that attempt's start to finish.
create view public.job_latency_24h with (security_invoker = true) as
select job_type,
       count(*) as completed,
       percentile_cont(0.50) within group (order by wait_s) as wait_p50_s,
       percentile_cont(0.95) within group (order by wait_s) as wait_p95_s,
       percentile_cont(0.99) within group (order by wait_s) as wait_p99_s,
       percentile_cont(0.50) within group (order by run_s) as run_p50_s,
       percentile_cont(0.95) within group (order by run_s) as run_p95_s,
       percentile_cont(0.99) within group (order by run_s) as run_p99_s
from (
  select job_type,
         extract(epoch from started_at - created_at)::float8 as wait_s,
         extract(epoch from finished_at - started_at)::float8 as run_s
  from public.jobs
  where status = 'completed' and finished_at >= now() - interval '24 hours'
) as done
group by job_type;

comment on view public.job_latency_24h is
  'Queue wait and run time percentiles (seconds) of the jobs completed in the last 24 hours, per job type.';

-- failed_jobs: jobs whose final error has this code; attempt_errors: every failed attempt with
-- this code, retried ones included; failure_rate: failed_jobs / (completed + failed).
create view public.job_failure_rates_24h with (security_invoker = true) as
with recent as (
  select job_type, status, error, errors
  from public.jobs
  where finished_at >= now() - interval '24 hours' and status in ('completed', 'failed')
),
totals as (
  select job_type, count(*) as finished_jobs from recent group by job_type
),
final as (
  select job_type, coalesce(error ->> 'code', 'UNKNOWN') as error_code, count(*) as failed_jobs
  from recent
  where status = 'failed'
  group by 1, 2
),
attempts as (
  select r.job_type, coalesce(e ->> 'code', 'UNKNOWN') as error_code, count(*) as attempt_errors
  from recent as r, jsonb_array_elements(r.errors) as e
  group by 1, 2
)
select job_type,
       error_code,
       coalesce(f.failed_jobs, 0) as failed_jobs,
       coalesce(a.attempt_errors, 0) as attempt_errors,
       t.finished_jobs,
       coalesce(f.failed_jobs, 0)::float8 / t.finished_jobs as failure_rate
from (select job_type, error_code from final union select job_type, error_code from attempts) as codes
join totals as t using (job_type)
left join final as f using (job_type, error_code)
left join attempts as a using (job_type, error_code);

comment on view public.job_failure_rates_24h is
  'Per job type and error code, over jobs completed or failed in the last 24 hours.';

-- oldest_queued_age_s: how long the oldest due job has waited since it was submitted.
create view public.queue_depth with (security_invoker = true) as
with queues as (
  select queue from public.job_types
  union
  select queue from public.jobs where status in ('queued', 'processing')
)
select q.queue,
       count(j.id) filter (where j.status = 'queued' and j.run_at <= now()) as queued,
       count(j.id) filter (where j.status = 'queued' and j.run_at > now()) as scheduled,
       count(j.id) filter (where j.status = 'processing') as processing,
       extract(epoch from now() - min(j.created_at) filter (where j.status = 'queued' and j.run_at <= now()))::float8
         as oldest_queued_age_s
from queues as q
left join public.jobs as j on j.queue = q.queue and j.status in ('queued', 'processing')
group by q.queue;

comment on view public.queue_depth is
  'Per queue: due and scheduled queued jobs, running jobs, age of the oldest due job (seconds).';

-- Workers that stopped beating without saying so, one row per job each still holds (or one
-- row with no job). Their jobs return to the queue when the lease expires.
create function public.stale_workers(stale_after interval default interval '60 seconds')
returns table (
  worker_id text,
  host text,
  pid integer,
  state text,
  heartbeat_at timestamptz,
  heartbeat_age_s double precision,
  queues text[],
  job_id uuid,
  job_type text,
  user_id uuid,
  attempts integer,
  lease_expires_at timestamptz
)
language sql stable set search_path = '' as $$
  select w.id, w.host, w.pid, w.state, w.heartbeat_at, extract(epoch from now() - w.heartbeat_at)::float8,
         w.queues, j.id, j.job_type, j.user_id, j.attempts, j.lease_expires_at
  from public.workers as w
  left join public.jobs as j on j.worker_id = w.id and j.status = 'processing'
  where w.state <> 'stopped' and w.heartbeat_at < now() - stale_after
  order by w.heartbeat_at, w.id, j.id
$$;

comment on function public.stale_workers(interval) is
  'Workers not stopped whose heartbeat is older than stale_after, with the processing jobs they hold.';

create view public.workers_stale with (security_invoker = true) as
select * from public.stale_workers();

comment on view public.workers_stale is 'public.stale_workers() with its default threshold (60 s).';

-- GPU seconds: the run time of each job's last attempt. Asset bytes: the sizes listed in
-- result.assets. user_id NULL: service jobs (CLI, benchmarks).
create view public.user_usage with (security_invoker = true) as
with every_job as (
  select user_id, status, created_at, started_at, finished_at, result from public.jobs
  union all
  select user_id, status, created_at, started_at, finished_at, job -> 'result' from public.jobs_archive
)
select user_id,
       count(*) as jobs,
       count(*) filter (where status = 'completed') as completed,
       count(*) filter (where status = 'failed') as failed,
       count(*) filter (where status = 'canceled') as canceled,
       count(*) filter (where status in ('queued', 'processing')) as active,
       coalesce(sum(extract(epoch from finished_at - started_at)::float8), 0) as gpu_seconds,
       coalesce(sum((select sum(size::numeric)
                     from jsonb_path_query(result, 'lax $.assets[*].size ? (@.type() == "number")') as size)),
                0)::bigint as asset_bytes,
       min(created_at) as first_job_at,
       max(created_at) as last_job_at
from every_job
group by user_id;

comment on view public.user_usage is
  'Per user, hot and archived jobs: counts by status, GPU seconds (last attempt run time), asset bytes.';

-- Retention: move (archive) or delete terminal jobs finished more than `older_than` ago, oldest
-- first, `batch_size` rows per statement and at most `max_batches` statements per call (NULL:
-- until done), so one call stays a bounded transaction; schedule it with pg_cron. Returns the
-- number of jobs removed from public.jobs.
create function public.prune_jobs(
  older_than interval default interval '30 days',
  archive boolean default true,
  batch_size integer default 1000,
  max_batches integer default 100
) returns bigint
language plpgsql set search_path = '' as $$
declare
  cutoff timestamptz := now() - older_than;
  removed bigint := 0;
  n bigint;
  batches integer := 0;
begin
  if older_than is null or older_than < interval '0' then
    raise exception 'prune_jobs: older_than must be a positive interval, not %', older_than
      using errcode = 'invalid_parameter_value';
  end if;
  if batch_size is null or batch_size < 1 or max_batches < 1 then
    raise exception 'prune_jobs: batch_size and max_batches must be at least 1'
      using errcode = 'invalid_parameter_value';
  end if;
  loop
    if archive then
      with doomed as (
        select id from public.jobs
        where finished_at < cutoff and status in ('completed', 'failed', 'canceled')
        order by finished_at
        limit batch_size
        for update skip locked
      ),
      gone as (
        delete from public.jobs as j using doomed where j.id = doomed.id returning j.*
      )
      insert into public.jobs_archive (id, user_id, job_type, queue, status, created_at, started_at, finished_at, job)
      select g.id, g.user_id, g.job_type, g.queue, g.status, g.created_at, g.started_at, g.finished_at, to_jsonb(g)
      from gone as g;
    else
      with doomed as (
        select id from public.jobs
        where finished_at < cutoff and status in ('completed', 'failed', 'canceled')
        order by finished_at
        limit batch_size
        for update skip locked
      )
      delete from public.jobs as j using doomed where j.id = doomed.id;
    end if;
    get diagnostics n = row_count;
    removed := removed + n;
    batches := batches + 1;
    exit when n < batch_size or batches >= max_batches;
  end loop;
  return removed;
end
$$;

comment on function public.prune_jobs(interval, boolean, integer, integer) is
  'Archive (or delete) terminal jobs finished before now() - older_than, in batches; returns the count.';

revoke all on table public.job_throughput_hourly, public.job_latency_24h, public.job_failure_rates_24h,
  public.queue_depth, public.workers_stale, public.user_usage from public, anon, authenticated;
grant select on table public.job_throughput_hourly, public.job_latency_24h, public.job_failure_rates_24h,
  public.queue_depth, public.workers_stale, public.user_usage to service_role;

revoke all on function public.stale_workers(interval) from public, anon, authenticated;
revoke all on function public.prune_jobs(interval, boolean, integer, integer) from public, anon, authenticated;
grant execute on function public.stale_workers(interval), public.prune_jobs(interval, boolean, integer, integer)
  to service_role;

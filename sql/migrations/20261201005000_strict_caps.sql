-- Caps that hold when workers claim at the same moment.
--
-- public.claim_jobs (20261201002000_fair_claim.sql) counted a user's running jobs in the snapshot of
-- its own statement: two workers claiming at once (every idle worker wakes on the same notify) both
-- saw the user below the cap and both took a job, so a cap of 1 could run one job per worker. Now,
-- while any cap is set, a claim first takes a transaction advisory lock that capped claims share,
-- then counts in a snapshot taken after it: the claim that comes second waits (for the fraction of
-- a millisecond the first takes to commit) and sees the first one's jobs running. Claims while no
-- cap is set do not take it, and are as before. And a capped user's finished job wakes the workers
-- of its queue (public.jobs_notify, at the end), so that user's next job starts without a poll.

create or replace function public.claim_jobs(
  served_types text[],
  max_jobs integer,
  affine_types text[],
  reach integer,
  aging_seconds double precision,
  claimer text,
  lease_seconds double precision
)
returns table (
  id uuid, user_id uuid, job_type text, queue text, payload jsonb, priority integer, attempts integer,
  max_attempts integer, created_at timestamptz, started_at timestamptz, run_at timestamptz, errors jsonb,
  claim_order bigint, more_queued boolean
)
language plpgsql volatile
set search_path = public  -- what the worker's own session has: triggers on jobs run as they would
set enable_seqscan = off
set enable_bitmapscan = off
set enable_sort = off
set plan_cache_mode = force_generic_plan
set jit = off
as $$
#variable_conflict use_column
begin
  if cardinality(claim_jobs.affine_types) = 0
     and not exists (select 1 from public.job_quotas as q where q.max_running_jobs is not null) then
  -- no model loaded here and no cap: the order is the heads' own, priority, turn, due time
  return query
  with head as materialized (
    select h.*
    from unnest(claim_jobs.served_types) as t(job_type)
    cross join lateral (
      select j.id, j.priority, j.turn, j.run_at
      from public.jobs as j
      where j.status = 'queued' and j.job_type = t.job_type and j.run_at <= now()
      order by j.priority desc, j.turn, j.run_at, j.id
      limit claim_jobs.reach + claim_jobs.max_jobs
    ) as h
  ),
  allowed as materialized (
    select h.id, row_number() over (order by h.priority desc, h.turn, h.run_at, h.id) as ord
    from head as h
    order by 2
  ),
  next as (
    -- status as text: a lookup no partial index can serve, only the primary key
    select a.id, a.ord
    from allowed as a
    cross join lateral (
      select 1 from public.jobs as j
      where j.id = a.id and j.status::text = 'queued'
      for update skip locked
    ) as locked
    limit claim_jobs.max_jobs
  ),
  picked as (
    select array_agg(n.id order by n.ord) as ids from next as n
  )
  update public.jobs as j
  set status = 'processing',
      worker_id = claim_jobs.claimer,
      attempts = j.attempts + 1,  -- counted at claim: a job that kills its worker is still bounded
      lease_expires_at = now() + make_interval(secs => claim_jobs.lease_seconds),
      started_at = now(),
      progress = 0,
      stage = 'running'
  from picked as p
  where j.id = any(p.ids)
  returning j.id, j.user_id, j.job_type, j.queue, j.payload, j.priority, j.attempts, j.max_attempts,
            j.created_at, j.started_at, j.run_at, j.errors, array_position(p.ids, j.id)::bigint,
            (select count(*) from head) > cardinality(p.ids);
  return;
  end if;

  -- Caps are counted in the snapshot of the next statement, taken after this lock: claims under
  -- caps take turns (each holds it until it commits, a fraction of a millisecond later), so each
  -- counts every job the claims before it took.
  if exists (select 1 from public.job_quotas as q where q.max_running_jobs is not null) then
    perform pg_advisory_xact_lock(1869968502, 1);  -- 1869968502: "ourv"; 1: capped claims
  end if;

  -- affinity or caps: the same heads, ordered and filtered as the comment above says
  return query
  with head as materialized (
    select h.*
    from unnest(claim_jobs.served_types) as t(job_type)
    cross join lateral (
      select j.id, j.user_id, j.job_type, j.priority, j.turn, j.run_at
      from public.jobs as j
      where j.status = 'queued' and j.job_type = t.job_type and j.run_at <= now()
      order by j.priority desc, j.turn, j.run_at, j.id
      limit claim_jobs.reach + claim_jobs.max_jobs
    ) as h
  ),
  fair as (
    -- a user's turns go to that user's jobs in the order they became due
    select h.id, h.user_id, h.job_type, h.priority, h.run_at,
           (array_agg(h.turn) over (partition by h.user_id, h.priority order by h.turn, h.id
                                    rows between unbounded preceding and unbounded following))
             [row_number() over (partition by h.user_id, h.priority order by h.run_at, h.id)] as turn,
           h.job_type = any(claim_jobs.affine_types) as affine,
           h.run_at < now() - make_interval(secs => claim_jobs.aging_seconds) as aged
    from head as h
  ),
  ranked as (
    select f.*,
           f.affine and not coalesce(bool_or(f.aged and not f.affine) over (
             partition by f.priority order by f.turn, f.run_at, f.id
             rows between unbounded preceding and 1 preceding), false) as preferred
    from fair as f
  ),
  ordered as (
    select r.id, r.user_id, r.job_type,
           row_number() over (order by r.priority desc, r.preferred desc, r.turn, r.run_at, r.id) as ord
    from ranked as r
  ),
  caps as materialized (
    select q.job_type, q.max_running_jobs as cap from public.job_quotas as q where q.max_running_jobs is not null
  ),
  counted as (
    select o.id, o.ord, o.user_id, g.cap as user_cap, c.cap as type_cap,
           row_number() over (partition by o.user_id order by o.ord) as nth_of_user,
           row_number() over (partition by o.user_id, o.job_type order by o.ord) as nth_of_type,
           run.user_running, run.type_running
    from ordered as o
    left join caps as g on g.job_type is null
    left join caps as c on c.job_type = o.job_type
    cross join lateral (
      select count(*) as user_running, count(*) filter (where r.job_type = o.job_type) as type_running
      from public.jobs as r
      where o.user_id is not null and coalesce(g.cap, c.cap) is not null
        and r.status = 'processing' and r.user_id = o.user_id
    ) as run
  ),
  allowed as materialized (
    select c.id, c.ord
    from counted as c
    where c.user_id is null
       or ((c.user_cap is null or c.user_running + c.nth_of_user <= c.user_cap)
           and (c.type_cap is null or c.type_running + c.nth_of_type <= c.type_cap))
    order by c.ord
  ),
  next as (
    -- status as text: a lookup no partial index can serve, only the primary key
    select a.id, a.ord
    from allowed as a
    cross join lateral (
      select 1 from public.jobs as j
      where j.id = a.id and j.status::text = 'queued'
      for update skip locked
    ) as locked
    limit claim_jobs.max_jobs
  ),
  picked as (
    select array_agg(n.id order by n.ord) as ids from next as n
  )
  update public.jobs as j
  set status = 'processing',
      worker_id = claim_jobs.claimer,
      attempts = j.attempts + 1,  -- counted at claim: a job that kills its worker is still bounded
      lease_expires_at = now() + make_interval(secs => claim_jobs.lease_seconds),
      started_at = now(),
      progress = 0,
      stage = 'running'
  from picked as p
  where j.id = any(p.ids)
  returning j.id, j.user_id, j.job_type, j.queue, j.payload, j.priority, j.attempts, j.max_attempts,
            j.created_at, j.started_at, j.run_at, j.errors, array_position(p.ids, j.id)::bigint,
            (select count(*) from head) > cardinality(p.ids);
end
$$;

-- A capped user's next job waits for a slot of theirs to free, and a finish sent no notify: every
-- worker that had passed over that job slept until its next poll. Now, while any cap is set, a
-- user's job that stops running (completed, failed, canceled, given back) wakes the workers of its
-- queue. A global cap covers every type: a job of the same user in another queue still waits for a
-- notify there or the next poll.
create or replace function public.jobs_notify() returns trigger
  language plpgsql set search_path = '' as $$
begin
  if new.status = 'queued' then
    perform pg_notify('ourvidz_jobs', new.queue);
  elsif new.status = 'processing' and new.cancel_requested
        and (tg_op = 'INSERT' or not old.cancel_requested) then
    perform pg_notify('ourvidz_cancel', new.id::text);
  elsif tg_op = 'UPDATE' and old.status = 'processing' and new.user_id is not null
        and exists (select 1 from public.job_quotas as q where q.max_running_jobs is not null) then
    perform pg_notify('ourvidz_jobs', new.queue);
  end if;
  return null;
end
$$;

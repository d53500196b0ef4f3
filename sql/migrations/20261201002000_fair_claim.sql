-- Claims that cost the same at any backlog, fair to every user, and where a queued job stands.
--
-- 1. Turns (round robin across users). Within a priority, every queued job holds a `turn`: one more
--    than its user's last queued job of that priority, and never behind the head of the queue. So a
--    user with 500 queued jobs holds turns h..h+499 and another user's single job gets turn h: it
--    runs after at most one job of each other user, not after all 500. Service jobs (user_id null)
--    are one user. A retried, rescued, released or given-back job keeps its turn (its place).
-- 2. The claim index is led by job_type, so a worker reads only the queues of the types it serves,
--    from their heads: a backlog of another type, a long history of finished rows and stale
--    statistics cost it nothing (worker/queue.py CLAIM_JOBS).
-- 3. An optional cap on the jobs of one user running at once (job_quotas.max_running_jobs).
-- 4. public.job_queue_position(): a signed-in user's queued jobs, their place and estimated start.

alter table public.jobs add column turn bigint not null default 0;

comment on column public.jobs.turn is
  'Round-robin turn within the priority: the claim takes lower turns first, so users take turns. Set at insert.';

-- The queued jobs of a deployed database get the turns they would have had: each user's in due order.
update public.jobs as j
set turn = t.turn
from (select id, row_number() over (partition by user_id, priority order by run_at, id) - 1 as turn
      from public.jobs where status = 'queued') as t
where j.id = t.id and t.turn > 0;

-- Replaces the claim index of 20261122000000_job_queue.sql: one ordered walk that every job type
-- shared, so a worker of type B walked all of type A's backlog to find its jobs.
drop index public.jobs_claim_idx;
create index jobs_claim_idx on public.jobs (job_type, priority desc, turn, run_at, id) where status = 'queued';
-- The head of each priority's queue and each user's last turn, for the insert trigger.
create index jobs_turn_idx on public.jobs (priority, turn) where status = 'queued';
create index jobs_user_turn_idx on public.jobs (user_id, priority, turn) where status = 'queued';
-- When the next scheduled job of a type becomes due (worker/queue.py NEXT_DUE).
create index jobs_due_idx on public.jobs (job_type, run_at) where status = 'queued';
-- The running jobs of a user, for the cap.
create index jobs_user_running_idx on public.jobs (user_id, job_type)
  where status = 'processing' and user_id is not null;

-- Named to fire after jobs_before_insert and jobs_before_insert_limits (name order): a row that
-- fails at insert, or that its quota refuses, needs no turn. Security definer: the head of the
-- queue is in other users' rows, which RLS hides from the inserting user. Index scans only: a plan
-- cached by a long-lived session (PostgREST's) while the table was small stays an index probe.
create function public.jobs_assign_turn() returns trigger
language plpgsql security definer
set search_path = ''
set enable_seqscan = off
set enable_bitmapscan = off
set enable_sort = off
as $$
declare
  head bigint;
  last bigint;
begin
  if new.status <> 'queued' then
    return new;
  end if;
  select j.turn into head from public.jobs as j
  where j.status = 'queued' and j.priority = new.priority
  order by j.turn limit 1;
  if new.user_id is null then
    select j.turn into last from public.jobs as j
    where j.status = 'queued' and j.user_id is null and j.priority = new.priority
    order by j.turn desc limit 1;
  else
    select j.turn into last from public.jobs as j
    where j.status = 'queued' and j.user_id = new.user_id and j.priority = new.priority
    order by j.turn desc limit 1;
  end if;
  new.turn := greatest(coalesce(last + 1, 0), coalesce(head, 0));
  return new;
end
$$;

revoke all on function public.jobs_assign_turn() from public, anon, authenticated;

create trigger jobs_before_insert_turn before insert on public.jobs
  for each row execute function public.jobs_assign_turn();

-- The cap. Read by the claim only: inserts are not refused for it (max_active_jobs does that).
alter table public.job_quotas add column max_running_jobs integer check (max_running_jobs >= 1);

comment on column public.job_quotas.max_running_jobs is
  'Jobs of one user running at once (of this type, or of all types for the global row); NULL: no cap. '
  'Service jobs (no user) are not capped.';

-- The claim (worker/queue.py CLAIM_JOBS calls it): up to max_jobs due jobs of the served types.
-- Order: priority; then, with model affinity, the types whose model is loaded here (affine_types)
-- unless a job ahead of them waited longer than aging_seconds; then the turn, so users take turns;
-- then the due time. Each served type's queue is read from its head, at most reach + max_jobs rows
-- (the slack covers rows other workers are locking right now, and users at their cap), so a claim
-- costs the same at any backlog. A user at their cap (job_quotas.max_running_jobs) is passed over.
-- Rows are locked one by one in that order with SKIP LOCKED, so concurrent workers never wait on
-- each other and never get the same job. Each row returned says in claim_order where it came in
-- that order, and in more_queued whether the heads held more due jobs than were taken: when not, a
-- worker need not claim again until something is queued (a notify) or comes due.
--
-- Without affinity and caps (no model loaded yet, a worker without models) the first statement
-- runs: the heads' own order, nothing else. The second, with affinity, hands each user's turns to
-- that user's jobs in the order they became due (the aging bound is about how long a job waited,
-- and a retry is due again only after its backoff), then applies affinity, aging and caps.
--
-- The settings pin the plans: only index scans, sorts only of the few rows read, generic plans
-- planned once per session and never from a table's statistics, no JIT. Each of the two
-- statements names its parameters claim_jobs.<name>: tests/test_claim.py prepares them as they are
-- to check their plans.
create function public.claim_jobs(
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

-- For the worker: postgres, service_role, or the login role of docs/security.md (granted there).
revoke all on function public.claim_jobs(text[], integer, text[], integer, double precision, text, double precision)
  from public, anon, authenticated;
grant execute on function public.claim_jobs(text[], integer, text[], integer, double precision, text, double precision)
  to service_role;

-- Where a signed-in user's queued jobs stand. Security definer: the jobs ahead are other users' rows,
-- which RLS hides from the caller; only counts of them leave the function, and only for the
-- caller's own queued jobs. The count stops at 10,000 jobs ahead (position_exact false).
--   position               1: the next job of its queue to start (jobs of its queue ahead + 1)
--   throughput_per_minute  jobs of the queue that finished in the last 15 minutes (at most the last
--                          500), per minute since the oldest of them; NULL: none finished
--   estimated_start_at     now + jobs ahead / throughput, not before run_at; NULL without throughput
create function public.job_queue_position(job_ids uuid[] default null)
returns table (
  job_id uuid,
  job_type text,
  queue text,
  priority integer,
  "position" bigint,
  position_exact boolean,
  throughput_per_minute double precision,
  estimated_start_at timestamptz
)
language sql stable security definer
set search_path = ''
set enable_seqscan = off  -- counts walk index ranges, whatever the statistics say
set jit = off
as $$
  with mine as (
    select j.id, j.job_type, j.queue, j.priority, j.turn, j.run_at
    from public.jobs as j
    where j.user_id = (select auth.uid()) and j.status = 'queued'
      and (job_ids is null or j.id = any(job_ids))
  ),
  ahead as (
    select m.id, count(*) as n
    from mine as m
    cross join lateral (
      select 1
      from public.job_types as t
      cross join lateral (
        select 1 from public.jobs as o
        where o.status = 'queued' and o.job_type = t.name and o.run_at <= now() and o.priority > m.priority
        union all
        select 1 from public.jobs as o
        where o.status = 'queued' and o.job_type = t.name and o.run_at <= now() and o.priority = m.priority
          and (o.turn, o.run_at, o.id) < (m.turn, m.run_at, m.id)
      ) as o
      where t.queue = m.queue
      limit 10001
    ) as counted
    group by m.id
  ),
  rate as (
    select q.queue, count(*) / greatest(extract(epoch from now() - min(f.finished_at)) / 60, 1) as per_minute
    from (select distinct queue from mine) as q
    cross join lateral (
      select o.finished_at from public.jobs as o
      where o.finished_at > now() - interval '15 minutes' and o.queue = q.queue and o.started_at is not null
      order by o.finished_at desc
      limit 500
    ) as f
    group by q.queue
  )
  select m.id, m.job_type, m.queue, m.priority,
         least(coalesce(a.n, 0), 10000) + 1,
         coalesce(a.n, 0) <= 10000,
         r.per_minute::double precision,
         case when r.per_minute is not null
              then greatest(m.run_at, now() + make_interval(secs => 60 * least(coalesce(a.n, 0), 10000) / r.per_minute))
         end
  from mine as m
  left join ahead as a on a.id = m.id
  left join rate as r on r.queue = m.queue
  order by m.queue, m.priority desc, m.turn, m.run_at, m.id
$$;

revoke all on function public.job_queue_position(uuid[]) from public, anon, service_role;
grant execute on function public.job_queue_position(uuid[]) to authenticated;

-- Who may do what through the Data API (PostgREST runs each request as `anon` or
-- `authenticated`, with the JWT in request.jwt.claims), and per-user quotas.
--
--   authenticated: insert own jobs (user_id, job_type, payload, priority only), read own jobs,
--                  set cancel_requested on own queued/processing jobs; read enabled job types.
--   anon:          read enabled job types; nothing else.
--   service_role / postgres (the worker): everything; bypasses RLS and quotas.
--
-- Supabase grants ALL on new public tables (and EXECUTE on new functions) to anon and
-- authenticated by default, so every grant here starts from a revoke.

revoke all on table public.jobs, public.job_types, public.workers from public, anon, authenticated;
grant all on table public.jobs, public.job_types, public.workers to service_role;

-- Column privileges are the first wall: a request naming any other column (status, result,
-- worker_id, attempts, run_at, max_attempts, ...) fails with "permission denied" before any
-- row is touched. run_at is left out too: a past run_at would jump the claim order.
grant select on table public.jobs to authenticated;
grant insert (user_id, job_type, payload, priority) on table public.jobs to authenticated;
grant update (cancel_requested) on table public.jobs to authenticated;

grant select on table public.job_types to anon, authenticated;

-- Quotas and limits on what end users may insert. A NULL job_type row is the global default.
-- Size and priority limits: the job type's row where it sets one, else the global row.
-- Count limits: each row over its own scope, both enforced (the global row counts all of a
-- user's jobs, a job type's row only that type). NULL means no limit from that row.
create table public.job_quotas (
  job_type text references public.job_types (name) on delete cascade on update cascade,
  max_active_jobs integer check (max_active_jobs >= 0),
  max_jobs_per_minute integer check (max_jobs_per_minute >= 0),
  max_prompt_chars integer check (max_prompt_chars >= 0),
  max_payload_bytes integer check (max_payload_bytes >= 0),
  min_priority integer check (min_priority between -100 and 100),
  max_priority integer check (max_priority between -100 and 100),
  updated_at timestamptz not null default now(),
  constraint job_quotas_one_row_per_scope unique nulls not distinct (job_type),
  constraint job_quotas_priority_range check (min_priority <= max_priority)
);

comment on table public.job_quotas is
  'Limits on jobs inserted by end users (role authenticated). job_type NULL: the global row. '
  'Size and priority limits: the type''s row, else the global row. Count limits: both rows, each over its scope.';
comment on column public.job_quotas.max_active_jobs is 'Queued + processing jobs per user (of this type, or of all types for the global row).';
comment on column public.job_quotas.max_jobs_per_minute is 'Inserts per user in the last 60 seconds (of this type, or of all types).';
comment on column public.job_quotas.max_prompt_chars is 'Longest prompt, negative_prompt, message, system_prompt, or messages[]/conversation_history[] content.';
comment on column public.job_quotas.max_payload_bytes is 'Size of the payload as JSON text, in bytes.';

alter table public.job_quotas enable row level security;
revoke all on table public.job_quotas from public, anon, authenticated;
grant all on table public.job_quotas to service_role;

insert into public.job_quotas
  (job_type, max_active_jobs, max_jobs_per_minute, max_prompt_chars, max_payload_bytes, min_priority, max_priority)
values (null, 10, 30, 1000, 65536, 0, 10);

-- Chat types carry conversations: longer texts than an image prompt (seed 001's limit is 1000).
insert into public.job_quotas (job_type, max_prompt_chars, max_payload_bytes)
select name, 32000, 262144 from public.job_types where handler = 'chat';

-- The limits that apply to a job type, for the insert checks and for frontends (RPC).
create function public.job_limits(job_type text)
returns table (
  max_active_jobs integer,
  max_jobs_per_minute integer,
  type_max_active_jobs integer,
  type_max_jobs_per_minute integer,
  max_prompt_chars integer,
  max_payload_bytes integer,
  min_priority integer,
  max_priority integer
)
language sql stable security definer set search_path = '' as $$
  select g.max_active_jobs, g.max_jobs_per_minute, t.max_active_jobs, t.max_jobs_per_minute,
         coalesce(t.max_prompt_chars, g.max_prompt_chars), coalesce(t.max_payload_bytes, g.max_payload_bytes),
         coalesce(t.min_priority, g.min_priority), coalesce(t.max_priority, g.max_priority)
  from (select 1) as one
  left join public.job_quotas as g on g.job_type is null
  left join public.job_quotas as t on t.job_type = job_limits.job_type
$$;

revoke all on function public.job_limits(text) from public, anon;
grant execute on function public.job_limits(text) to authenticated, service_role;

-- Serves the active-jobs count of the quota check. Service jobs (user_id NULL) never enter it.
create index jobs_user_active_idx on public.jobs (user_id, job_type)
  where status in ('queued', 'processing') and user_id is not null;

-- Enforced for end users only: the worker, the CLI and service-role requests are trusted.
-- Refusals raise SQLSTATE OVQTA (job type not available: OVTYP): MESSAGE says what happened and
-- HINT what to do, both fit to show to a user; DETAIL is JSON naming the quota, its limit and
-- the value that broke it. PostgREST answers 400 with all four.
create function public.jobs_enforce_limits() returns trigger
language plpgsql set search_path = '' as $$
declare
  lim record;
  n integer;
  n_type integer;
  longest integer;
  bytes integer;
begin
  if current_user <> 'authenticated' and coalesce(auth.role(), '') <> 'authenticated' then
    return new;
  end if;

  if not exists (select 1 from public.job_types where name = new.job_type and enabled) then
    raise exception using
      errcode = 'OVTYP',
      message = format('Job type "%s" is not available.', new.job_type),
      detail = jsonb_build_object('job_type', new.job_type)::text,
      hint = 'Choose one of the enabled job types in public.job_types.';
  end if;

  select * into lim from public.job_limits(new.job_type);

  if new.priority < lim.min_priority or new.priority > lim.max_priority then
    raise exception using
      errcode = 'OVQTA',
      message = format('Priority %s is not allowed; the range is %s to %s.',
                       new.priority, lim.min_priority, lim.max_priority),
      detail = jsonb_build_object('quota', 'priority', 'min', lim.min_priority, 'max', lim.max_priority,
                                  'current', new.priority, 'job_type', new.job_type)::text,
      hint = 'Leave priority out or choose one within the range.';
  end if;

  bytes := octet_length(new.payload::text);
  if bytes > lim.max_payload_bytes then
    raise exception using
      errcode = 'OVQTA',
      message = format('The request is too large (%s bytes); the limit is %s bytes.', bytes, lim.max_payload_bytes),
      detail = jsonb_build_object('quota', 'max_payload_bytes', 'limit', lim.max_payload_bytes,
                                  'current', bytes, 'job_type', new.job_type)::text,
      hint = 'Send a smaller request.';
  end if;

  select max(char_length(t)) into longest
  from (
    select new.payload ->> k as t from unnest(array['prompt', 'negative_prompt', 'message', 'system_prompt']) as k
    union all
    select v #>> '{}' from jsonb_path_query(new.payload, 'lax $.messages[*].content') as v
    union all
    select v #>> '{}' from jsonb_path_query(new.payload, 'lax $.conversation_history[*].content') as v
  ) as texts;
  if longest > lim.max_prompt_chars then
    raise exception using
      errcode = 'OVQTA',
      message = format('The prompt is too long (%s characters); the limit is %s.', longest, lim.max_prompt_chars),
      detail = jsonb_build_object('quota', 'max_prompt_chars', 'limit', lim.max_prompt_chars,
                                  'current', longest, 'job_type', new.job_type)::text,
      hint = 'Shorten the prompt.';
  end if;

  if coalesce(lim.max_active_jobs, lim.type_max_active_jobs, lim.max_jobs_per_minute,
              lim.type_max_jobs_per_minute) is null then
    return new;
  end if;

  -- One inserter per user at a time, until commit: concurrent requests see each other's rows
  -- and cannot overshoot. Two-key form: its own lock space, apart from bigint advisory keys.
  perform pg_advisory_xact_lock(28534, hashtext(new.user_id::text));

  select count(*), count(*) filter (where job_type = new.job_type) into n, n_type
  from public.jobs
  where user_id = new.user_id and status in ('queued', 'processing');
  if n >= lim.max_active_jobs then
    raise exception using
      errcode = 'OVQTA',
      message = format('You already have %s jobs queued or running; the limit is %s.', n, lim.max_active_jobs),
      detail = jsonb_build_object('quota', 'max_active_jobs', 'limit', lim.max_active_jobs,
                                  'current', n, 'job_type', null)::text,
      hint = 'Wait for a job to finish, or cancel one.';
  end if;
  if n_type >= lim.type_max_active_jobs then
    raise exception using
      errcode = 'OVQTA',
      message = format('You already have %s %s jobs queued or running; the limit is %s.',
                       n_type, new.job_type, lim.type_max_active_jobs),
      detail = jsonb_build_object('quota', 'max_active_jobs', 'limit', lim.type_max_active_jobs,
                                  'current', n_type, 'job_type', new.job_type)::text,
      hint = 'Wait for a job to finish, or cancel one.';
  end if;

  select count(*), count(*) filter (where job_type = new.job_type) into n, n_type
  from public.jobs
  where user_id = new.user_id and created_at > now() - interval '1 minute';
  if n >= lim.max_jobs_per_minute then
    raise exception using
      errcode = 'OVQTA',
      message = format('Too many requests: at most %s jobs per minute.', lim.max_jobs_per_minute),
      detail = jsonb_build_object('quota', 'max_jobs_per_minute', 'limit', lim.max_jobs_per_minute,
                                  'current', n, 'job_type', null)::text,
      hint = 'Try again in a minute.';
  end if;
  if n_type >= lim.type_max_jobs_per_minute then
    raise exception using
      errcode = 'OVQTA',
      message = format('Too many requests: at most %s %s jobs per minute.',
                       lim.type_max_jobs_per_minute, new.job_type),
      detail = jsonb_build_object('quota', 'max_jobs_per_minute', 'limit', lim.type_max_jobs_per_minute,
                                  'current', n_type, 'job_type', new.job_type)::text,
      hint = 'Try again in a minute.';
  end if;
  return new;
end
$$;

revoke all on function public.jobs_enforce_limits() from public, anon, authenticated;

-- Named to fire after jobs_before_insert (triggers fire in name order), on user jobs only.
create trigger jobs_before_insert_limits before insert on public.jobs
  for each row when (new.user_id is not null) execute function public.jobs_enforce_limits();

-- A cancel request is a one-way latch, for everyone.
create function public.jobs_cancel_is_final() returns trigger language plpgsql set search_path = '' as $$
begin
  raise exception 'job %: a cancel request cannot be withdrawn', old.id using errcode = 'check_violation';
end
$$;

revoke all on function public.jobs_cancel_is_final() from public, anon, authenticated;

create trigger jobs_cancel_is_final before update of cancel_requested on public.jobs
  for each row when (old.cancel_requested and not new.cancel_requested)
  execute function public.jobs_cancel_is_final();

-- Row policies. `(select auth.uid())` is evaluated once per statement, not per row.
create policy jobs_insert_own on public.jobs for insert to authenticated
  with check (
    user_id = (select auth.uid())
    and status = 'queued'
    and exists (select 1 from public.job_types as t where t.name = jobs.job_type and t.enabled)
    and exists (select 1 from public.job_limits(jobs.job_type) as l
                where jobs.priority between coalesce(l.min_priority, -100) and coalesce(l.max_priority, 100))
  );

create policy jobs_select_own on public.jobs for select to authenticated
  using (user_id = (select auth.uid()));

-- Only cancel_requested is updatable (column privilege); a queued job it cancels becomes
-- `canceled` in jobs_before_update, hence no status condition in WITH CHECK.
create policy jobs_cancel_own on public.jobs for update to authenticated
  using (user_id = (select auth.uid()) and status in ('queued', 'processing'))
  with check (user_id = (select auth.uid()));

create policy job_types_read_enabled on public.job_types for select to anon, authenticated
  using (enabled);

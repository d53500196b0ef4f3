-- Model residency on the workers row (worker/memory.py): each heartbeat writes the loaded models
-- (loaded_models: [{handler, model, bytes, last_used_at, in_use}]), VRAM used/total (GPU only),
-- what the memory manager counts against its budget, the budget, and the pressure level.

alter table public.workers
  add column memory_used_mb integer,
  add column memory_budget_mb integer,
  add column memory_pressure text check (memory_pressure in ('low', 'medium', 'high', 'critical'));

comment on column public.workers.loaded_models is
  'Models resident in the worker: [{handler, model, bytes, last_used_at, in_use}], written each heartbeat.';
comment on column public.workers.memory_used_mb is
  'What counts against the budget: device memory in use on a GPU, the loaded models'' bytes on CPU.';
comment on column public.workers.memory_budget_mb is
  'Memory the loaded models may fill before idle ones are evicted; NULL: unlimited.';
comment on column public.workers.memory_pressure is
  'low | medium | high | critical, from memory_used_mb / memory_budget_mb.';

-- One row per live worker for dashboards: what it holds and how full it is.
create view public.worker_memory with (security_invoker = true) as
select w.id as worker_id,
       w.host,
       w.state,
       array(select m ->> 'model' from jsonb_array_elements(w.loaded_models) as m) as models,
       jsonb_array_length(w.loaded_models) as model_count,
       w.vram_used_mb,
       w.vram_total_mb,
       w.memory_used_mb,
       w.memory_budget_mb,
       round(100.0 * w.memory_used_mb / nullif(w.memory_budget_mb, 0), 1) as budget_used_pct,
       w.memory_pressure,
       w.heartbeat_at
from public.workers as w
where w.state <> 'stopped';

comment on view public.worker_memory is
  'Live workers: loaded models, VRAM used/total, budget use and memory pressure (from their heartbeats).';

revoke all on table public.worker_memory from public, anon, authenticated;
grant select on table public.worker_memory to service_role;

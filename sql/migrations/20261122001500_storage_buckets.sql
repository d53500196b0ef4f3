-- Storage buckets for the assets of each job type (seed 002) and for users' reference images,
-- and the storage.objects policies that let a signed-in user read only their own folder.
-- Objects are named `<user_id>/<job_id>/<index>.<ext>` (`<user_id>/<file>` for references), so
-- the first folder of a name is its owner. The worker uses the service role, which bypasses RLS.
-- All buckets are private: results carry signed URLs.

insert into storage.buckets (id, name, public, file_size_limit, allowed_mime_types)
values
  ('sdxl_image_fast',       'sdxl_image_fast',       false,  20971520, array['image/png']),
  ('sdxl_image_high',       'sdxl_image_high',       false,  20971520, array['image/png']),
  ('image_fast',            'image_fast',            false,  20971520, array['image/png']),
  ('image_high',            'image_high',            false,  20971520, array['image/png']),
  ('image7b_fast_enhanced', 'image7b_fast_enhanced', false,  20971520, array['image/png']),
  ('image7b_high_enhanced', 'image7b_high_enhanced', false,  20971520, array['image/png']),
  -- videos, their PNG thumbnails, and the PNG of a one-frame request
  ('video_fast',            'video_fast',            false,  52428800, array['video/mp4', 'image/png']),
  ('video_high',            'video_high',            false,  52428800, array['video/mp4', 'image/png']),
  ('video7b_fast_enhanced', 'video7b_fast_enhanced', false,  52428800, array['video/mp4', 'image/png']),
  ('video7b_high_enhanced', 'video7b_high_enhanced', false,  52428800, array['video/mp4', 'image/png']),
  ('reference_images',      'reference_images',      false,  10485760, array['image/png', 'image/jpeg', 'image/webp']),
  -- the report of the `simulate` job type (demos, smoke tests against a real project)
  ('simulate',              'simulate',              false,   1048576, array['application/json'])
on conflict (id) do nothing;

create policy "ourvidz: users read their own assets"
  on storage.objects for select to authenticated
  using (
    bucket_id in ('sdxl_image_fast', 'sdxl_image_high', 'image_fast', 'image_high',
                  'image7b_fast_enhanced', 'image7b_high_enhanced', 'video_fast', 'video_high',
                  'video7b_fast_enhanced', 'video7b_high_enhanced', 'reference_images', 'simulate')
    and (storage.foldername(name))[1] = (select auth.uid())::text
  );

create policy "ourvidz: users upload reference images into their own folder"
  on storage.objects for insert to authenticated
  with check (
    bucket_id = 'reference_images'
    and (storage.foldername(name))[1] = (select auth.uid())::text
  );

-- An upsert from supabase-js updates the existing object; a user may also replace or remove
-- their own reference images, never generated assets (those are the worker's).
create policy "ourvidz: users replace their own reference images"
  on storage.objects for update to authenticated
  using (bucket_id = 'reference_images' and (storage.foldername(name))[1] = (select auth.uid())::text)
  with check (bucket_id = 'reference_images' and (storage.foldername(name))[1] = (select auth.uid())::text);

create policy "ourvidz: users delete their own reference images"
  on storage.objects for delete to authenticated
  using (bucket_id = 'reference_images' and (storage.foldername(name))[1] = (select auth.uid())::text);
